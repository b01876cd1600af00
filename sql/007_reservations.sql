-- Reservations (SPEC A10), the write-behind of their changes (stages/persist.py): one row
-- per reservation, moved forward only by a newer version. The live state (bookings,
-- schedules) is in Redis (stages/lua/bookings.lua). Each statement may run again without harm.
CREATE TABLE IF NOT EXISTS reservations (
    id             UUID         PRIMARY KEY,
    request_id     VARCHAR(128) NOT NULL,
    user_id        VARCHAR(255) NOT NULL,
    tenant_id      VARCHAR(255),
    device_id      VARCHAR(255) NOT NULL,
    pool           VARCHAR(255) NOT NULL,
    start_at       TIMESTAMPTZ  NOT NULL,
    end_at         TIMESTAMPTZ  NOT NULL CHECK (end_at > start_at),
    status         VARCHAR(20)  NOT NULL
                   CHECK (status IN ('booked', 'active', 'completed', 'cancelled', 'no_show')),
    allocation_id  UUID,
    reason         VARCHAR(50),
    created_at     TIMESTAMPTZ  NOT NULL,
    claimed_at     TIMESTAMPTZ,
    claim_by       TIMESTAMPTZ,
    ended_at       TIMESTAMPTZ,
    version        BIGINT       NOT NULL,
    updated_at     TIMESTAMPTZ  NOT NULL DEFAULT NOW()
);
COMMENT ON TABLE reservations IS 'Reservations of devices over an interval (write-behind of Redis)';
COMMENT ON COLUMN reservations.allocation_id IS 'The allocation it became at its start';
COMMENT ON COLUMN reservations.claim_by IS 'Active and unclaimed: ends no_show at this time';

DROP TRIGGER IF EXISTS reservations_updated_at ON reservations;
CREATE TRIGGER reservations_updated_at
    BEFORE UPDATE ON reservations
    FOR EACH ROW EXECUTE FUNCTION devsched_touch_updated_at();

CREATE INDEX IF NOT EXISTS idx_rsv_device_start ON reservations (device_id, start_at);
CREATE INDEX IF NOT EXISTS idx_rsv_user_status  ON reservations (user_id, status);
CREATE INDEX IF NOT EXISTS idx_rsv_live         ON reservations (start_at)
    WHERE status IN ('booked', 'active');

-- The allocation of a reservation not claimed in time ends for `no_show`; the ledger
-- keeps that reason (schemas.messages.EndReason).
ALTER TABLE billing_ledger DROP CONSTRAINT IF EXISTS billing_ledger_end_reason_check;
ALTER TABLE billing_ledger ADD CONSTRAINT billing_ledger_end_reason_check CHECK (end_reason IN (
    'released', 'expired', 'device_failed', 'device_deleted', 'device_maintenance',
    'device_stopped', 'device_error', 'user_deleted', 'user_suspended', 'quota_reduced',
    'quota_exceeded', 'payment_failed', 'billing_overdue', 'no_show'));
