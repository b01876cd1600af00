-- Devices and user quotas, as the write-behind of admin changes (add device, set quota).
CREATE TABLE IF NOT EXISTS devices (
    id          VARCHAR(255) PRIMARY KEY,
    name        VARCHAR(255) NOT NULL,
    pool        VARCHAR(255) NOT NULL DEFAULT 'default',
    model       VARCHAR(255) NOT NULL DEFAULT 'generic',
    host        VARCHAR(255) NOT NULL,
    adb_host    VARCHAR(255) NOT NULL,
    adb_port    INTEGER      NOT NULL CHECK (adb_port BETWEEN 1 AND 65535),
    cpu_cores   INTEGER      NOT NULL CHECK (cpu_cores > 0),
    memory_mb   INTEGER      NOT NULL CHECK (memory_mb > 0),
    storage_mb  INTEGER      NOT NULL CHECK (storage_mb >= 0),
    status      VARCHAR(50)  NOT NULL DEFAULT 'available',
    version     BIGINT       NOT NULL DEFAULT 1,
    created_at  TIMESTAMPTZ  NOT NULL DEFAULT NOW(),
    updated_at  TIMESTAMPTZ  NOT NULL DEFAULT NOW()
);
CREATE INDEX IF NOT EXISTS idx_devices_pool ON devices (pool);

DROP TRIGGER IF EXISTS devices_updated_at ON devices;
CREATE TRIGGER devices_updated_at BEFORE UPDATE ON devices
    FOR EACH ROW EXECUTE FUNCTION devsched_touch_updated_at();

CREATE TABLE IF NOT EXISTS user_quotas (
    user_id                  VARCHAR(255) PRIMARY KEY,
    status                   VARCHAR(50)  NOT NULL DEFAULT 'active'
                             CHECK (status IN ('active', 'suspended', 'expired', 'overdue')),
    expires_at               TIMESTAMPTZ,
    max_devices              INTEGER NOT NULL CHECK (max_devices >= 0),
    max_cpu_per_device       INTEGER NOT NULL CHECK (max_cpu_per_device >= 0),
    max_memory_mb_per_device INTEGER NOT NULL CHECK (max_memory_mb_per_device >= 0),
    total_cpu_cores          INTEGER NOT NULL CHECK (total_cpu_cores >= 0),
    total_memory_gb          INTEGER NOT NULL CHECK (total_memory_gb >= 0),
    total_storage_gb         INTEGER NOT NULL CHECK (total_storage_gb >= 0),
    version                  BIGINT  NOT NULL DEFAULT 1,
    updated_at               TIMESTAMPTZ NOT NULL DEFAULT NOW()
);

DROP TRIGGER IF EXISTS user_quotas_updated_at ON user_quotas;
CREATE TRIGGER user_quotas_updated_at BEFORE UPDATE ON user_quotas
    FOR EACH ROW EXECUTE FUNCTION devsched_touch_updated_at();
