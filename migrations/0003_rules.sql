-- Rules deployed through the Admin API (sluice.v1.Admin/DeployRule). Rules
-- from the rules directory are not stored here: the directory is their
-- source of truth. `version` counts deploys of the name.
CREATE TABLE rules (
    name          text        PRIMARY KEY,
    topic         text        NOT NULL,
    module        bytea       NOT NULL,
    module_sha256 text        NOT NULL,
    config        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    limits        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    enabled       boolean     NOT NULL DEFAULT true,
    version       integer     NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$')
);

-- Per-device rule state (ABI v1 state_get / state_set), written by the
-- writer in the same transaction as the outputs of the batch that changed
-- it, so the two never disagree after a crash.
CREATE TABLE rule_state (
    rule       text        NOT NULL,
    device_id  text        NOT NULL,
    key        text        NOT NULL,
    value      bytea       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule, device_id, key)
);
