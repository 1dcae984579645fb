// patgate's self-service token page: plain ES2020, no framework, no build step.
//
// Signed in by the product's session JWT: handed over once in the URL fragment
// (#session=<jwt>, kept in sessionStorage, the fragment removed at once) and sent as a bearer
// token, or else the HttpOnly session cookie, with X-Patgate-Csrf on every change. A new
// token's plaintext lives only in the one-time dialog while it is open: never in a URL, a
// log, or localStorage.
'use strict';

(() => {
  const API = '/_patgate/api/v1';
  const SESSION_KEY = 'patgate.session';
  const SOON_MS = 7 * 24 * 3600 * 1000;
  const DAY_MS = 24 * 3600 * 1000;
  const REVOKED_REASONS = {
    user: 'by its owner',
    admin: 'by an administrator',
    owner_deactivated: 'owner deactivated',
    owner_downgraded: "owner's role changed",
    rotated: 'rotated',
    leaked: 'reported leaked',
  };

  const $ = (id) => document.getElementById(id);
  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium' });
  const dateTimeFormat = new Intl.DateTimeFormat(undefined, {
    dateStyle: 'medium',
    timeStyle: 'short',
  });
  const relative = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });

  const state = {
    session: takeSession(),
    me: null,
    permissions: new Set(),
    roles: [],
    users: null, // null: the caller may not list users (no owner field)
    tokens: [],
    showAll: false,
  };

  // -- session -------------------------------------------------------------------------------

  function takeSession() {
    const fragment = new URLSearchParams(window.location.hash.slice(1));
    const handed = fragment.get('session');
    if (handed) {
      sessionStorage.setItem(SESSION_KEY, handed);
      history.replaceState(null, '', window.location.pathname + window.location.search);
    }
    return sessionStorage.getItem(SESSION_KEY);
  }

  // -- the API -------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail);
      this.status = status;
      this.code = code;
      this.detail = detail;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    if (state.session) {
      headers.Authorization = `Bearer ${state.session}`;
    } else if (method !== 'GET') {
      headers['X-Patgate-Csrf'] = '1'; // the browser adds the same-origin Origin
    }
    const init = { method, headers, credentials: 'same-origin', cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(API + path, init);
    } catch (_) {
      throw new ApiError(0, 'network', 'patgate could not be reached');
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const type = (data && typeof data.type === 'string' && data.type) || '';
      const detail = (data && (data.detail || data.title)) || response.statusText;
      const error = new ApiError(response.status, type.split(':').pop(), detail);
      if (response.status === 401) signedOut();
      throw error;
    }
    return data;
  }

  function sentence(text) {
    const trimmed = String(text || '').trim();
    if (!trimmed) return '';
    const first = trimmed[0].toUpperCase() + trimmed.slice(1);
    return /[.!?]$/.test(first) ? first : `${first}.`;
  }

  // What went wrong, as a person would say it (the seeds' FAQ wording).
  function explain(error, action) {
    if (!(error instanceof ApiError)) return 'Something went wrong. Please try again.';
    if (error.status === 0) return 'patgate could not be reached. Check your connection and try again.';
    if (error.code === 'mfa_required') {
      return 'Sign in with two-factor authentication to create tokens.';
    }
    if (error.status === 401) return 'Your session has expired or is not valid. Sign in again.';
    if (error.status === 403) {
      const lead = action === 'generate'
        ? "You don't have permission to generate tokens."
        : "You don't have permission to do that.";
      const detail = sentence(error.detail);
      return detail && detail !== lead ? `${lead} ${detail}` : lead;
    }
    if (error.status === 503) return 'The token store is unavailable right now. Try again in a moment.';
    return sentence(error.detail) || 'Something went wrong. Please try again.';
  }

  // -- permissions (as gateway.policy.allows) ------------------------------------------------

  function allows(needed) {
    const granted = state.permissions;
    if (granted.has(needed) || granted.has('*')) return true;
    const parts = needed.split(':');
    for (let i = parts.length - 1; i >= 1; i -= 1) {
      if (granted.has(`${parts.slice(0, i).join(':')}:*`)) return true;
    }
    return false;
  }

  // -- small DOM helpers ---------------------------------------------------------------------

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'className') node.className = value;
      else if (name === 'dataset') Object.assign(node.dataset, value);
      else if (name === 'hidden') node.hidden = Boolean(value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function longTime(iso) {
    return dateTimeFormat.format(new Date(iso));
  }

  function timeElement(iso, format) {
    return el('time', { datetime: iso, title: longTime(iso) }, format.format(new Date(iso)));
  }

  function ago(iso) {
    const seconds = (new Date(iso).getTime() - Date.now()) / 1000;
    const steps = [
      [60, 'second'],
      [60, 'minute'],
      [24, 'hour'],
      [30, 'day'],
      [12, 'month'],
      [Infinity, 'year'],
    ];
    let value = seconds;
    for (const [size, unit] of steps) {
      if (Math.abs(value) < size) return relative.format(Math.round(value), unit);
      value /= size;
    }
    return '';
  }

  function showAlert(message) {
    const box = $('alert');
    box.textContent = message;
    box.hidden = !message;
  }

  function announce(message) {
    $('notice').textContent = message;
  }

  // -- loading -------------------------------------------------------------------------------

  function signedOut() {
    if (state.session) {
      sessionStorage.removeItem(SESSION_KEY);
      state.session = null;
    }
  }

  async function start() {
    try {
      state.me = await api('GET', '/me');
    } catch (error) {
      $('loading').hidden = true;
      showAlert(
        error.status === 401
          ? 'You are not signed in. Open this page from your product, or use the link that ' +
              '“patgate demo” prints.'
          : explain(error),
      );
      return;
    }
    state.permissions = new Set(state.me.permissions);
    renderWho();
    const mayCreate = allows('tokens:create') || allows('tokens:admin');
    $('generate').hidden = !mayCreate;
    $('cannot-create').hidden = mayCreate;
    $('toolbar').hidden = !allows('tokens:admin');
    await Promise.all([loadRoles(), loadUsers()]);
    await loadTokens();
  }

  function renderWho() {
    const me = state.me;
    const who = me.email ? `${me.email} (${me.user_id})` : me.user_id;
    $('whoami').textContent = `Signed in as ${who}${me.role ? ` · ${me.role}` : ''}`;
  }

  async function loadRoles() {
    try {
      state.roles = (await api('GET', '/roles')).items;
    } catch (_) {
      state.roles = [];
    }
    const select = $('g-role');
    select.replaceChildren(el('option', { value: '' }, 'Same as owner'));
    for (const role of state.roles) {
      select.append(el('option', { value: role.name }, role.name));
    }
  }

  async function loadUsers() {
    state.users = null;
    if (!allows('tokens:admin')) return;
    try {
      state.users = (await api('GET', '/users')).items;
    } catch (_) {
      state.users = null; // 403: no users:admin, so no owner field
    }
  }

  async function loadTokens() {
    const query = state.showAll ? '?all=true' : '';
    try {
      state.tokens = (await api('GET', `/tokens${query}`)).items;
      showAlert('');
    } catch (error) {
      showAlert(explain(error));
      state.tokens = [];
    }
    $('loading').hidden = true;
    renderTokens();
  }

  // -- the list ------------------------------------------------------------------------------

  function statusBadges(token) {
    const cell = [];
    if (token.state === 'revoked') {
      cell.push(el('span', { className: 'badge badge-revoked' }, 'Revoked'));
      const reason = REVOKED_REASONS[token.revoked_reason];
      if (reason) cell.push(el('span', { className: 'reason' }, reason));
    } else if (token.state === 'expired') {
      cell.push(el('span', { className: 'badge badge-expired' }, 'Expired'));
    } else {
      cell.push(el('span', { className: 'badge badge-active' }, 'Active'));
      if (token.expires_at && new Date(token.expires_at).getTime() - Date.now() < SOON_MS) {
        cell.push(el('span', { className: 'badge badge-soon' }, 'Expires soon'));
      }
    }
    return cell;
  }

  function ownerName(userId) {
    const user = state.users && state.users.find((u) => u.id === userId);
    return user && user.email ? `${user.email} (${userId})` : userId;
  }

  function ownerLines(userId) {
    const user = state.users && state.users.find((u) => u.id === userId);
    if (!user || !user.email) return [userId];
    return [el('span', { className: 'email' }, user.email), el('span', { className: 'sub' }, userId)];
  }

  function cell(label, className, ...content) {
    // One wrapper: on narrow screens the cell is a two-column grid (label, value).
    return el('td', { className, dataset: { label } }, el('div', { className: 'value' }, ...content));
  }

  function actionsMenu(token) {
    if (token.state === 'revoked') return el('td', { className: 'actions-cell' });
    const menuId = `menu-${token.id}`;
    const trigger = el(
      'button',
      {
        type: 'button',
        className: 'menu-button',
        'aria-expanded': 'false',
        'aria-controls': menuId,
        'aria-label': `Actions for ${token.name}`,
        dataset: { menuFor: token.id },
      },
      el('span', { 'aria-hidden': 'true' }, '⋯'),
    );
    const item = (action, text, className) =>
      el('button', { type: 'button', className, dataset: { action, token: token.id } }, text);
    const menu = el(
      'div',
      { className: 'menu', id: menuId, hidden: true },
      item('rename', 'Rename'),
      item('refresh', token.state === 'expired' ? 'Refresh (reactivate)' : 'Refresh'),
      item('rotate', 'Rotate'),
      item('revoke', 'Revoke', 'danger'),
    );
    return el('td', { className: 'actions-cell' }, el('div', { className: 'row-menu' }, trigger, menu));
  }

  function tokenRow(token) {
    const expires = token.expires_at
      ? timeElement(token.expires_at, dateFormat)
      : el('span', { className: 'muted' }, 'Never');
    const lastUsed = token.last_used_at
      ? el(
          'span',
          { className: 'last-used' },
          el('time', { datetime: token.last_used_at, title: longTime(token.last_used_at) }, ago(token.last_used_at)),
          token.last_used_ip ? el('span', { className: 'ip' }, `from ${token.last_used_ip}`) : null,
        )
      : el('span', { className: 'muted' }, 'Never');
    return el(
      'tr',
      { dataset: { tokenId: token.id, state: token.state } },
      el('th', { scope: 'row', className: 'name-cell' }, token.name),
      cell('Token', 'prefix-cell', el('code', {}, `${token.prefix}…`)),
      cell('Status', 'status-cell', ...statusBadges(token)),
      cell('Role', 'role-cell', token.role || el('span', { className: 'muted' }, 'Same as owner')),
      state.showAll ? cell('Owner', 'owner-cell', ...ownerLines(token.user_id)) : null,
      cell('Created', 'created-cell', timeElement(token.created_at, dateFormat)),
      cell('Expires', 'expires-cell', expires),
      cell('Last used', 'used-cell', lastUsed),
      actionsMenu(token),
    );
  }

  function sortedTokens() {
    return [...state.tokens].sort((a, b) => {
      const revoked = Number(a.state === 'revoked') - Number(b.state === 'revoked');
      return revoked || b.created_at.localeCompare(a.created_at);
    });
  }

  function renderTokens() {
    const tokens = sortedTokens();
    $('owner-heading').hidden = !state.showAll;
    $('tokens-caption').textContent = state.showAll ? "All users' tokens" : 'Your tokens';
    $('token-rows').replaceChildren(...tokens.map(tokenRow));
    $('tokens').hidden = tokens.length === 0;
    $('empty').hidden = tokens.length !== 0;
    $('empty').textContent = state.showAll
      ? 'No one in your company has a token yet.'
      : 'No tokens yet. Generate one to connect an integration.';
  }

  function focusRow(tokenId) {
    const target = tokenId && document.querySelector(`[data-menu-for="${CSS.escape(tokenId)}"]`);
    (target || $('generate')).focus();
  }

  // -- the per-token menu (a disclosure: a button that shows a group of buttons) -------------

  let openMenu = null;

  function closeMenu({ focus = false } = {}) {
    if (!openMenu) return;
    const { trigger, menu } = openMenu;
    menu.hidden = true;
    trigger.setAttribute('aria-expanded', 'false');
    openMenu = null;
    if (focus) trigger.focus();
  }

  function toggleMenu(trigger) {
    const menu = $(trigger.getAttribute('aria-controls'));
    const wasOpen = openMenu && openMenu.trigger === trigger;
    closeMenu();
    if (wasOpen) return;
    menu.hidden = false;
    trigger.setAttribute('aria-expanded', 'true');
    openMenu = { trigger, menu };
    menu.querySelector('button').focus();
  }

  function menuKeys(event) {
    if (!openMenu) return;
    if (event.key === 'Escape') {
      event.preventDefault();
      closeMenu({ focus: true });
      return;
    }
    const items = [...openMenu.menu.querySelectorAll('button')];
    const index = items.indexOf(document.activeElement);
    const moves = { ArrowDown: 1, ArrowUp: -1, Home: -index, End: items.length - 1 - index };
    if (index >= 0 && event.key in moves) {
      event.preventDefault();
      items[(index + moves[event.key] + items.length) % items.length].focus();
    }
  }

  // -- dialogs -------------------------------------------------------------------------------

  let returnFocus = null; // a token id, or null for the Generate button

  function openDialog(dialog) {
    showFormErrorIn(dialog, '');
    dialog.showModal();
  }

  function showFormErrorIn(dialog, message) {
    const box = dialog.querySelector('.form-error');
    if (box) {
      box.textContent = message;
      box.hidden = !message;
    }
  }

  function busy(form, on) {
    for (const button of form.querySelectorAll('button')) button.disabled = on;
    form.setAttribute('aria-busy', on ? 'true' : 'false');
  }

  function tokenById(id) {
    return state.tokens.find((t) => t.id === id);
  }

  // Generate --------------------------------------------------------------------------------

  function isoDate(moment) {
    const pad = (n) => String(n).padStart(2, '0');
    return `${moment.getFullYear()}-${pad(moment.getMonth() + 1)}-${pad(moment.getDate())}`;
  }

  function expiryHint() {
    const choice = $('g-expiry').value;
    $('g-date-field').hidden = choice !== 'date';
    $('g-date').required = choice === 'date';
    let text = '';
    if (choice === 'never') {
      text = 'The token stays valid until it is revoked. Prefer an expiry where you can.';
    } else if (choice === 'date') {
      text = 'The token stops working at the end of that day.';
    } else {
      const at = new Date(Date.now() + Number(choice) * DAY_MS);
      text = `The token expires on ${dateFormat.format(at)}. Refresh it before then.`;
    }
    $('g-expiry-hint').textContent = text;
  }

  function roleHint() {
    const role = state.roles.find((r) => r.name === $('g-role').value);
    $('g-role-hint').textContent = role
      ? `Permissions: ${role.permissions.join(', ') || 'none'}. A token never gets more than its owner has.`
      : "The token has its owner's permissions, whatever their role becomes.";
  }

  function openGenerate() {
    returnFocus = null;
    const form = $('generate-form');
    form.reset();
    const ownerField = $('g-owner-field');
    ownerField.hidden = !state.users;
    if (state.users) {
      const select = $('g-owner');
      select.replaceChildren(
        ...state.users
          .filter((u) => u.status === 'active')
          .map((u) =>
            el(
              'option',
              { value: u.id, selected: u.id === state.me.user_id },
              u.email ? `${u.email} (${u.id}, ${u.role})` : `${u.id} (${u.role})`,
            ),
          ),
      );
    }
    $('g-date').min = isoDate(new Date(Date.now() + DAY_MS));
    expiryHint();
    roleHint();
    openDialog($('generate-dialog'));
  }

  function generateBody() {
    const form = $('generate-form');
    const body = { name: form.elements.name.value.trim() };
    const choice = form.elements.expiry.value;
    if (choice === 'never') {
      body.no_expiry = true;
    } else if (choice === 'date') {
      // The end of the chosen day, in the browser's time zone.
      body.expires_at = new Date(`${form.elements.date.value}T23:59:59`).toISOString();
    } else {
      body.expires_in_days = Number(choice);
    }
    if (form.elements.role.value) body.role = form.elements.role.value;
    const owner = state.users ? form.elements.owner.value : '';
    if (owner && owner !== state.me.user_id) body.user_id = owner;
    return body;
  }

  async function submitGenerate(event) {
    event.preventDefault();
    const form = $('generate-form');
    if (!form.reportValidity()) return;
    const body = generateBody();
    busy(form, true);
    try {
      const created = await api('POST', '/tokens', body);
      $('generate-dialog').close();
      showToken(created, created.dropped_permissions || []);
      await loadTokens();
    } catch (error) {
      showFormErrorIn($('generate-dialog'), explain(error, 'generate'));
    } finally {
      busy(form, false);
    }
  }

  // The one-time token dialog ---------------------------------------------------------------

  function showToken(created, dropped) {
    const owner = created.user_id !== state.me.user_id ? ` for ${ownerName(created.user_id)}` : '';
    $('token-label').textContent = `Token “${created.name}” (${created.prefix}…)${owner}`;
    $('token-value').value = created.token;
    $('copy').textContent = 'Copy';
    $('copy-status').textContent = '';
    const list = $('dropped-list');
    list.replaceChildren(...dropped.map((p) => el('li', {}, el('code', {}, p))));
    $('kept').textContent = `What it may do: ${created.permissions.join(', ') || 'nothing'}.`;
    $('dropped').hidden = dropped.length === 0;
    $('token-dialog').showModal();
    $('copy').focus();
  }

  function forgetToken() {
    $('token-value').value = '';
    $('copy').textContent = 'Copy';
    $('copy-status').textContent = '';
    $('dropped-list').replaceChildren();
    $('kept').textContent = '';
    $('dropped').hidden = true;
  }

  async function copyToken() {
    const input = $('token-value');
    try {
      await navigator.clipboard.writeText(input.value);
      $('copy').textContent = 'Copied';
      $('copy-status').textContent = 'Copied to the clipboard.';
    } catch (_) {
      input.focus();
      input.select();
      $('copy-status').textContent = 'Copying is blocked here: the token is selected, press Ctrl+C (⌘C).';
    }
  }

  // Rename ----------------------------------------------------------------------------------

  let renaming = null;

  function openRename(token) {
    renaming = token.id;
    returnFocus = token.id;
    const form = $('rename-form');
    form.reset();
    form.elements.name.value = token.name;
    openDialog($('rename-dialog'));
    form.elements.name.select();
  }

  async function submitRename(event) {
    event.preventDefault();
    const form = $('rename-form');
    if (!form.reportValidity()) return;
    busy(form, true);
    try {
      const row = await api('PATCH', `/tokens/${encodeURIComponent(renaming)}`, {
        name: form.elements.name.value.trim(),
      });
      $('rename-dialog').close();
      announce(`Renamed to “${row.name}”.`);
      await loadTokens();
      focusRow(row.id);
    } catch (error) {
      showFormErrorIn($('rename-dialog'), explain(error));
    } finally {
      busy(form, false);
    }
  }

  // Revoke and rotate: confirmed first ------------------------------------------------------

  let confirming = null;

  function openConfirm(token, action) {
    confirming = { id: token.id, action };
    returnFocus = token.id;
    if (action === 'revoke') {
      $('confirm-title').textContent = 'Revoke token?';
      $('confirm-text').textContent =
        `Anything using “${token.name}” (${token.prefix}…) stops working at once. ` +
        'A revoked token cannot be used again.';
      $('confirm-button').textContent = 'Revoke token';
    } else {
      $('confirm-title').textContent = 'Rotate token?';
      $('confirm-text').textContent =
        `“${token.name}” (${token.prefix}…) is replaced by a new token, shown once, and ` +
        'the current one stops working. Update your integration with the new token.';
      $('confirm-button').textContent = 'Rotate token';
    }
    openDialog($('confirm-dialog'));
  }

  async function submitConfirm(event) {
    event.preventDefault();
    const form = $('confirm-form');
    const { id, action } = confirming;
    const path = `/tokens/${encodeURIComponent(id)}`;
    busy(form, true);
    try {
      if (action === 'revoke') {
        const row = await api('DELETE', path);
        $('confirm-dialog').close();
        announce(`“${row.name}” is revoked.`);
        await loadTokens();
        focusRow(null);
      } else {
        const created = await api('POST', `${path}/rotate`);
        returnFocus = created.id;
        $('confirm-dialog').close();
        showToken(created, []);
        await loadTokens();
      }
    } catch (error) {
      showFormErrorIn($('confirm-dialog'), explain(error, action === 'rotate' ? 'generate' : ''));
    } finally {
      busy(form, false);
    }
  }

  // Refresh: no dialog ----------------------------------------------------------------------

  async function refresh(token) {
    try {
      const row = await api('POST', `/tokens/${encodeURIComponent(token.id)}/refresh`);
      const until = row.expires_at ? dateFormat.format(new Date(row.expires_at)) : 'never';
      announce(`“${row.name}” refreshed: it expires ${row.expires_at ? `on ${until}` : 'never'}.`);
      showAlert('');
      await loadTokens();
      focusRow(row.id);
    } catch (error) {
      showAlert(explain(error));
    }
  }

  // -- wiring --------------------------------------------------------------------------------

  function onClick(event) {
    const target = event.target instanceof Element ? event.target : null;
    if (!target) return;
    const closer = target.closest('[data-close]');
    if (closer) {
      const dialog = closer.closest('dialog');
      if (dialog.id === 'token-dialog') forgetToken(); // now, not when 'close' fires later
      dialog.close();
      return;
    }
    const trigger = target.closest('[data-menu-for]');
    if (trigger) {
      toggleMenu(trigger);
      return;
    }
    const item = target.closest('[data-action]');
    if (item) {
      closeMenu();
      const token = tokenById(item.dataset.token);
      if (!token) return;
      const action = item.dataset.action;
      if (action === 'rename') openRename(token);
      else if (action === 'refresh') refresh(token);
      else openConfirm(token, action);
      return;
    }
    if (openMenu && !openMenu.menu.contains(target)) closeMenu();
  }

  function onDialogClosed(event) {
    const dialog = event.target;
    if (dialog.id === 'token-dialog') forgetToken();
    showFormErrorIn(dialog, '');
    if (dialog.id === 'confirm-dialog') confirming = null;
    if (dialog.id === 'rename-dialog') renaming = null;
    // Back to what opened it (its row may have been drawn again meanwhile).
    if (!document.querySelector('dialog[open]')) focusRow(returnFocus);
  }

  function wire() {
    document.addEventListener('click', onClick);
    document.addEventListener('keydown', menuKeys);
    document.addEventListener('focusin', (event) => {
      if (openMenu && !openMenu.trigger.parentElement.contains(event.target)) closeMenu();
    });
    $('generate').addEventListener('click', openGenerate);
    $('generate-form').addEventListener('submit', submitGenerate);
    $('rename-form').addEventListener('submit', submitRename);
    $('confirm-form').addEventListener('submit', submitConfirm);
    $('g-expiry').addEventListener('change', expiryHint);
    $('g-role').addEventListener('change', roleHint);
    $('copy').addEventListener('click', copyToken);
    $('show-all').addEventListener('change', (event) => {
      state.showAll = event.target.checked;
      loadTokens();
    });
    for (const dialog of document.querySelectorAll('dialog')) {
      dialog.addEventListener('close', onDialogClosed);
    }
    $('token-dialog').addEventListener('cancel', forgetToken); // Esc, before it closes
  }

  wire();
  start();
})();
