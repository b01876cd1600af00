-- The billing ledger: one row per closed allocation, metered to the second.
-- The primary key on allocation_id is what makes billing exactly-once under redelivery.
CREATE TABLE IF NOT EXISTS billing_ledger (
    allocation_id    UUID PRIMARY KEY,
    user_id          VARCHAR(255) NOT NULL,
    tenant_id        VARCHAR(255),
    device_id        VARCHAR(255) NOT NULL,
    started_at       TIMESTAMPTZ  NOT NULL,
    ended_at         TIMESTAMPTZ  NOT NULL,
    duration_seconds INTEGER      NOT NULL CHECK (duration_seconds >= 0),
    cpu_cores        INTEGER      NOT NULL,
    memory_mb        INTEGER      NOT NULL,
    end_reason       VARCHAR(50)  NOT NULL CHECK (end_reason IN ('released', 'expired')),
    exported_at      TIMESTAMPTZ,
    created_at       TIMESTAMPTZ  NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_ledger_user ON billing_ledger (user_id, ended_at);
CREATE INDEX IF NOT EXISTS idx_ledger_unexported ON billing_ledger (created_at)
    WHERE exported_at IS NULL;
