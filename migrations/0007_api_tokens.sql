-- API tokens for the gRPC API. A token is shown once, when it is created;
-- only its SHA-256 is kept. Tokens are 256 random bits, so a fast hash is
-- as safe as a slow one here (unlike device passwords, which may be weak
-- and get Argon2id).
CREATE TABLE api_tokens (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 128),
    scope text NOT NULL CHECK (scope IN ('read', 'admin')),
    token_sha256 bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- NULL: never expires.
    expires_at timestamptz,
    -- Set by `sluice tokens revoke`; a revoked token is refused at once by
    -- new servers and within the cache lifetime by running ones.
    revoked_at timestamptz,
    last_used_at timestamptz
);
