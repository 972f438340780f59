-- The device registry. A device's id is its MQTT client id; its secret is
-- kept only as an Argon2id hash (PHC string format).
CREATE TABLE devices (
    id                 text        PRIMARY KEY,
    secret_hash        text        NOT NULL,
    enabled            boolean     NOT NULL DEFAULT true,
    created_at         timestamptz NOT NULL DEFAULT now(),
    last_connect_at    timestamptz,
    last_disconnect_at timestamptz,
    online             boolean     NOT NULL DEFAULT false,
    metadata           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    CHECK (id <> '' AND length(id) <= 256 AND id !~ '[/+#$[:cntrl:]]')
);
