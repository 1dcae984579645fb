-- patgate schema: tenants, their users, their tokens, and the audit trail of every change.
-- Token plaintext is never stored: `hash` is SHA-256 (or HMAC-SHA256 under a pepper).

CREATE TABLE companies (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id          text PRIMARY KEY,            -- the backend's own user id
    company_id  text NOT NULL REFERENCES companies (id),
    role        text NOT NULL,
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'deactivated')),
    email       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX users_company_idx ON users (company_id);

CREATE TABLE tokens (
    id              uuid PRIMARY KEY,
    name            text NOT NULL,
    prefix          text NOT NULL,           -- display prefix, e.g. pat_3kF9
    hash            bytea NOT NULL,
    role            text,                    -- optional scope role
    scopes          text[],                  -- fixed at creation when a role is given
    user_id         text NOT NULL REFERENCES users (id),
    company_id      text NOT NULL REFERENCES companies (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL,
    expires_at      timestamptz,             -- null: never expires
    last_used_at    timestamptz,
    last_used_ip    inet,
    revoked_at      timestamptz,
    revoked_reason  text CHECK (revoked_reason IN
                        ('user', 'admin', 'owner_deactivated', 'owner_downgraded', 'rotated', 'leaked')),
    rotated_to      uuid REFERENCES tokens (id),
    CONSTRAINT tokens_revoked_has_reason CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL))
);
CREATE UNIQUE INDEX tokens_hash_idx ON tokens (hash);
CREATE INDEX tokens_user_idx ON tokens (user_id, created_at);
CREATE INDEX tokens_company_idx ON tokens (company_id, created_at);

CREATE TABLE token_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_id    uuid NOT NULL REFERENCES tokens (id),
    event       text NOT NULL,
    actor       text NOT NULL,               -- user id, or 'cli'
    at          timestamptz NOT NULL DEFAULT now(),
    ip          inet,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX token_events_token_idx ON token_events (token_id, at);
