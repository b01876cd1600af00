-- Allocations, as the write-behind of the changes stream. One row per allocation;
-- `version` grows with each change so a late or replayed change never overwrites a newer row.
CREATE TABLE IF NOT EXISTS device_allocations (
    id               UUID PRIMARY KEY,
    device_id        VARCHAR(255) NOT NULL,
    user_id          VARCHAR(255) NOT NULL,
    tenant_id        VARCHAR(255),
    status           VARCHAR(50)  NOT NULL DEFAULT 'allocated'
                     CHECK (status IN ('allocated', 'released', 'expired')),
    allocated_at     TIMESTAMPTZ  NOT NULL DEFAULT NOW(),
    released_at      TIMESTAMPTZ,
    expires_at       TIMESTAMPTZ,
    duration_minutes INTEGER      NOT NULL DEFAULT 60 CHECK (duration_minutes > 0),
    duration_seconds INTEGER      CHECK (duration_seconds >= 0),
    metadata         JSONB,
    version          BIGINT       NOT NULL DEFAULT 1,
    created_at       TIMESTAMPTZ  NOT NULL DEFAULT NOW(),
    updated_at       TIMESTAMPTZ  NOT NULL DEFAULT NOW()
);

COMMENT ON TABLE device_allocations IS 'Device allocations (write-behind of Redis live state)';
COMMENT ON COLUMN device_allocations.duration_seconds IS 'Exact billed length, whole seconds';
COMMENT ON COLUMN device_allocations.version IS 'Change version; rows only move forward';

CREATE OR REPLACE FUNCTION devsched_touch_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at = NOW();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS device_allocations_updated_at ON device_allocations;
CREATE TRIGGER device_allocations_updated_at
    BEFORE UPDATE ON device_allocations
    FOR EACH ROW EXECUTE FUNCTION devsched_touch_updated_at();

CREATE INDEX IF NOT EXISTS idx_alloc_device        ON device_allocations (device_id);
CREATE INDEX IF NOT EXISTS idx_alloc_user          ON device_allocations (user_id);
CREATE INDEX IF NOT EXISTS idx_alloc_tenant        ON device_allocations (tenant_id);
CREATE INDEX IF NOT EXISTS idx_alloc_status        ON device_allocations (status);
CREATE INDEX IF NOT EXISTS idx_alloc_allocated_at  ON device_allocations (allocated_at);
CREATE INDEX IF NOT EXISTS idx_alloc_device_status ON device_allocations (device_id, status);
CREATE INDEX IF NOT EXISTS idx_alloc_user_status   ON device_allocations (user_id, status);
CREATE INDEX IF NOT EXISTS idx_alloc_tenant_status ON device_allocations (tenant_id, status);
CREATE INDEX IF NOT EXISTS idx_alloc_status_expires ON device_allocations (status, expires_at);
CREATE INDEX IF NOT EXISTS idx_alloc_active        ON device_allocations (expires_at)
    WHERE status = 'allocated';
