-- Keys the server generates for itself, shared by every Sluice on the same
-- database: today the one that signs the gRPC API's page tokens, so a token
-- from one server works on another and after a restart.
CREATE TABLE server_keys (
    purpose text PRIMARY KEY,
    secret bytea NOT NULL CHECK (length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
