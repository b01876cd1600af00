-- Global interval schedules (stages/schedules.py): interim ledger rows, usage reports,
-- and the record of permanently failed tenant runs. The live state of the schedules
-- (tenants, batches, retry queue) is in Redis under the {sched} hash tag.

-- The ledger gets interim rows beside the final one. A row covers [covered_from,
-- covered_to) of its allocation; covered_to_s is that end in whole seconds from the
-- allocation's start (started_at). Interim rows of an allocation are contiguous from its
-- start; the final row, written at release, bills only what they have not
-- (duration_seconds = the allocation's exact length - the interim rows' sum), so the
-- rows of an allocation add up to its exact length in seconds.
ALTER TABLE billing_ledger ADD COLUMN IF NOT EXISTS kind VARCHAR(10) NOT NULL DEFAULT 'final';
ALTER TABLE billing_ledger DROP CONSTRAINT IF EXISTS billing_ledger_kind_check;
ALTER TABLE billing_ledger ADD CONSTRAINT billing_ledger_kind_check
    CHECK (kind IN ('final', 'interim'));
ALTER TABLE billing_ledger ADD COLUMN IF NOT EXISTS covered_from TIMESTAMPTZ;
ALTER TABLE billing_ledger ADD COLUMN IF NOT EXISTS covered_to TIMESTAMPTZ;
ALTER TABLE billing_ledger ADD COLUMN IF NOT EXISTS covered_to_s INTEGER
    CHECK (covered_to_s >= 0);
UPDATE billing_ledger SET covered_from = started_at, covered_to = ended_at,
    covered_to_s = duration_seconds WHERE covered_to_s IS NULL;
-- The entry id, the billing service's dedupe key: the allocation id for the final row,
-- '<allocation id>:<covered_to_s>' for an interim one.
ALTER TABLE billing_ledger ADD COLUMN IF NOT EXISTS entry_id TEXT GENERATED ALWAYS AS (
    CASE WHEN kind = 'final' THEN allocation_id::text
         ELSE allocation_id::text || ':' || covered_to_s::text END) STORED;
COMMENT ON COLUMN billing_ledger.kind IS 'final (at release, once) or interim (periodic metering)';
COMMENT ON COLUMN billing_ledger.entry_id IS 'Dedupe key of the usage entry: allocation id (final), allocation id:covered_to_s (interim)';

-- Exactly once: one final row per allocation (as the old primary key), one interim row
-- per allocation and covered end.
ALTER TABLE billing_ledger DROP CONSTRAINT IF EXISTS billing_ledger_pkey;
CREATE UNIQUE INDEX IF NOT EXISTS billing_ledger_final ON billing_ledger (allocation_id)
    WHERE kind = 'final';
CREATE UNIQUE INDEX IF NOT EXISTS billing_ledger_entry ON billing_ledger (entry_id);
CREATE INDEX IF NOT EXISTS idx_ledger_interim ON billing_ledger (allocation_id)
    WHERE kind = 'interim';
CREATE INDEX IF NOT EXISTS idx_ledger_tenant_unexported ON billing_ledger (tenant_id)
    WHERE exported_at IS NULL AND kind = 'interim';

-- end_reason of an interim row is 'interim' (and 007's 'no_show' stays allowed).
ALTER TABLE billing_ledger DROP CONSTRAINT IF EXISTS billing_ledger_end_reason_check;
ALTER TABLE billing_ledger ADD CONSTRAINT billing_ledger_end_reason_check CHECK (end_reason IN (
    'released', 'expired', 'device_failed', 'device_deleted', 'device_maintenance',
    'device_stopped', 'device_error', 'user_deleted', 'user_suspended', 'quota_reduced',
    'quota_exceeded', 'payment_failed', 'billing_overdue', 'no_show', 'interim'));

-- The usage report: per tenant, period and pool, the devices used and device-seconds
-- (the overlap of each allocation with the period), one row per (tenant, period, pool).
CREATE TABLE IF NOT EXISTS usage_reports (
    tenant_id      VARCHAR(255) NOT NULL,
    period_start   TIMESTAMPTZ  NOT NULL,
    period_end     TIMESTAMPTZ  NOT NULL,
    pool           VARCHAR(255) NOT NULL,
    devices_used   INTEGER      NOT NULL CHECK (devices_used >= 0),
    allocations    INTEGER      NOT NULL CHECK (allocations >= 0),
    device_seconds BIGINT       NOT NULL CHECK (device_seconds >= 0),
    created_at     TIMESTAMPTZ  NOT NULL DEFAULT NOW(),
    PRIMARY KEY (tenant_id, period_end, pool),
    CHECK (period_end > period_start)
);
COMMENT ON TABLE usage_reports IS 'Per-tenant usage by pool and period (usage_report schedules)';
