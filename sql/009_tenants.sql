-- Tenants of the global schedules and the schedules' pauses, the write-behind of their
-- changes (stages/persist.py, from TenantChange and ScheduleChange): one row each, moved
-- forward only by a newer version (one counter of the schedules gives every change its
-- version, so a tenant deleted and created again moves on). The live state is in Redis
-- under {sched} (stages/lua/schedules.lua); `devsched rebuild` restores it from these rows.
-- Each statement may run again without harm.
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id      VARCHAR(255) PRIMARY KEY,
    status         VARCHAR(10)  NOT NULL CHECK (status IN ('active', 'deleted')),
    plan           VARCHAR(100),
    override_ms    BIGINT       CHECK (override_ms > 0),
    override_until TIMESTAMPTZ,
    event_version  BIGINT,
    created_at     TIMESTAMPTZ,
    last_action    VARCHAR(20)  NOT NULL,
    version        BIGINT       NOT NULL,
    changed_at     TIMESTAMPTZ  NOT NULL,
    updated_at     TIMESTAMPTZ  NOT NULL DEFAULT NOW(),
    CHECK (status = 'deleted' OR plan IS NOT NULL)
);
COMMENT ON TABLE tenants IS 'Tenant registry of the global schedules (write-behind of Redis)';
COMMENT ON COLUMN tenants.override_ms IS 'Custom interval in force until override_until (then the plan''s tier)';
COMMENT ON COLUMN tenants.event_version IS 'Version of the last tenant.* event applied';

DROP TRIGGER IF EXISTS tenants_updated_at ON tenants;
CREATE TRIGGER tenants_updated_at
    BEFORE UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION devsched_touch_updated_at();

CREATE INDEX IF NOT EXISTS idx_tenants_active ON tenants (tenant_id) WHERE status = 'active';

CREATE TABLE IF NOT EXISTS schedule_state (
    schedule_id VARCHAR(255) PRIMARY KEY,
    paused      BOOLEAN      NOT NULL,
    version     BIGINT       NOT NULL,
    changed_at  TIMESTAMPTZ  NOT NULL,
    updated_at  TIMESTAMPTZ  NOT NULL DEFAULT NOW()
);
COMMENT ON TABLE schedule_state IS 'Paused or resumed global schedules (write-behind of Redis)';

DROP TRIGGER IF EXISTS schedule_state_updated_at ON schedule_state;
CREATE TRIGGER schedule_state_updated_at
    BEFORE UPDATE ON schedule_state
    FOR EACH ROW EXECUTE FUNCTION devsched_touch_updated_at();

-- The purge job deletes ended reservations and old usage reports by their time.
CREATE INDEX IF NOT EXISTS idx_rsv_ended ON reservations (ended_at)
    WHERE status IN ('completed', 'cancelled', 'no_show');
CREATE INDEX IF NOT EXISTS idx_usage_reports_period_end ON usage_reports (period_end);
