//! The registry's schema, one numbered step per change, run in order on SQLite and PostgreSQL
//! alike (by `macula_common::store::Db::open`).

use macula_common::store::{Migration, Schema};

/// The registry's schema.
pub static SCHEMA: Schema = Schema {
    name: "registry",
    migrations: MIGRATIONS,
};

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "accounts, realms, policy versions, members, keys, transfers, fees, claims, audit",
        sql: r#"
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    failed_logins BIGINT NOT NULL DEFAULT 0,
    locked_until BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    client TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE realms (
    name TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES accounts(id),
    parent TEXT,
    tier TEXT NOT NULL,
    suspended TEXT NOT NULL DEFAULT '',
    frozen TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    authority_key TEXT NOT NULL,
    authority_cert TEXT NOT NULL,
    policy_version BIGINT NOT NULL
);
CREATE INDEX realms_owner ON realms(owner_id, name);
CREATE TABLE policy_versions (
    realm TEXT NOT NULL REFERENCES realms(name) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    doc TEXT NOT NULL,
    author TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (realm, version)
);
CREATE TABLE members (
    realm TEXT NOT NULL REFERENCES realms(name) ON DELETE CASCADE,
    email TEXT NOT NULL,
    role TEXT NOT NULL,
    added_by TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    PRIMARY KEY (realm, email)
);
CREATE INDEX members_email ON members(email, realm);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    realm TEXT NOT NULL REFERENCES realms(name) ON DELETE CASCADE,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    pubkey TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_realm ON api_keys(realm, id);
CREATE TABLE transfer_codes (
    realm TEXT PRIMARY KEY REFERENCES realms(name) ON DELETE CASCADE,
    code_hash TEXT NOT NULL,
    created_by TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE fees (
    id {serial},
    account_id TEXT NOT NULL,
    realm TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE claims (
    id TEXT PRIMARY KEY,
    realm TEXT NOT NULL,
    claimant TEXT NOT NULL,
    note TEXT NOT NULL,
    status TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE audit (
    id {serial},
    realm TEXT,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    remote TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX audit_realm ON audit(realm, id);
CREATE TABLE idempotency (
    account_id TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status BIGINT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (account_id, key)
);
"#,
    },
    Migration {
        version: 2,
        name: "write guard (optimistic writes)",
        sql: r#"
CREATE TABLE write_guard (ok BIGINT NOT NULL CHECK (ok = 1));
"#,
    },
    Migration {
        version: 3,
        name: "metering, plans, notices, invoices, payments, ledger",
        sql: r#"
CREATE TABLE usage_reports (
    node TEXT NOT NULL,
    epoch TEXT NOT NULL,
    realm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    hour BIGINT NOT NULL,
    ops_publish BIGINT NOT NULL,
    ops_subscribe BIGINT NOT NULL,
    ops_call BIGINT NOT NULL,
    ops_register BIGINT NOT NULL,
    ops_dht BIGINT NOT NULL,
    bytes_in BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    latency TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (node, epoch, realm, key_id, hour)
);
CREATE INDEX usage_reports_realm ON usage_reports(realm, hour);
CREATE TABLE usage_rollups (
    realm TEXT NOT NULL,
    period TEXT NOT NULL,
    start BIGINT NOT NULL,
    ops_publish BIGINT NOT NULL,
    ops_subscribe BIGINT NOT NULL,
    ops_call BIGINT NOT NULL,
    ops_register BIGINT NOT NULL,
    ops_dht BIGINT NOT NULL,
    bytes_in BIGINT NOT NULL,
    bytes_out BIGINT NOT NULL,
    PRIMARY KEY (realm, period, start)
);
CREATE INDEX usage_rollups_period ON usage_rollups(period, start);
ALTER TABLE realms ADD COLUMN quota_blocked BIGINT NOT NULL DEFAULT 0;
CREATE TABLE plan_history (
    realm TEXT NOT NULL,
    tier TEXT NOT NULL,
    effective_at BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (realm, effective_at)
);
CREATE TABLE addons (
    realm TEXT NOT NULL,
    feature TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    ended_at BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (realm, feature, started_at)
);
CREATE TABLE notices (
    realm TEXT NOT NULL,
    period BIGINT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (realm, period, kind)
);
CREATE TABLE invoices (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    month BIGINT NOT NULL,
    status TEXT NOT NULL,
    currency TEXT NOT NULL,
    subtotal_cents BIGINT NOT NULL,
    total_cents BIGINT NOT NULL,
    lines TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    finalized_at BIGINT NOT NULL DEFAULT 0,
    paid_at BIGINT NOT NULL DEFAULT 0,
    voided_at BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX invoices_account_month ON invoices(account_id, month) WHERE status <> 'void';
CREATE TABLE payments (
    id TEXT PRIMARY KEY,
    invoice_id TEXT NOT NULL REFERENCES invoices(id),
    provider TEXT NOT NULL,
    reference TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE ledger (
    id {serial},
    txn TEXT NOT NULL,
    account TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    kind TEXT NOT NULL,
    ref TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX ledger_txn ON ledger(txn);
CREATE INDEX ledger_account ON ledger(account, id);
"#,
    },
    Migration {
        version: 4,
        name: "registrations: a generation per realm name; login failures per (account, source)",
        sql: r#"
CREATE TABLE realm_generations (
    name TEXT PRIMARY KEY,
    generation BIGINT NOT NULL
);
INSERT INTO realm_generations (name, generation) SELECT name, 1 FROM realms;
ALTER TABLE realms ADD COLUMN generation BIGINT NOT NULL DEFAULT 1;
CREATE TABLE login_failures (
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    failed BIGINT NOT NULL,
    locked_until BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (account_id, source)
);
"#,
    },
    Migration {
        version: 5,
        name: "email verification",
        sql: r#"
ALTER TABLE accounts ADD COLUMN email_verified_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN email_since BIGINT NOT NULL DEFAULT 0;
UPDATE accounts SET email_verified_at = created_at, email_since = created_at;
CREATE TABLE email_tokens (
    token_hash TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    email TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX email_tokens_account ON email_tokens(account_id, created_at);
"#,
    },
    Migration {
        version: 6,
        name: "login: failures per account and hour; sources that logged in",
        sql: r#"
ALTER TABLE accounts ADD COLUMN failed_window_start BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN failed_in_window BIGINT NOT NULL DEFAULT 0;
CREATE TABLE login_sources (
    account_id TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    last_ok BIGINT NOT NULL,
    PRIMARY KEY (account_id, source)
);
"#,
    },
    Migration {
        version: 7,
        name: "audit by actor (registrations per account and day)",
        sql: r#"
CREATE INDEX audit_actor ON audit(actor, action, at);
"#,
    },
    Migration {
        version: 8,
        name: "compute: milliseconds of replicas run (billed per instance-hour)",
        sql: r#"
ALTER TABLE usage_reports ADD COLUMN instance_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_rollups ADD COLUMN instance_ms BIGINT NOT NULL DEFAULT 0;
"#,
    },
    Migration {
        version: 9,
        name: "the Hub: publishers, their signing keys, releases",
        sql: r#"
CREATE TABLE hub_publishers (
    namespace TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL REFERENCES accounts(id),
    display_name TEXT NOT NULL,
    verified_by TEXT NOT NULL,
    grants TEXT NOT NULL,
    threshold BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX hub_publishers_owner ON hub_publishers(owner_id);
CREATE TABLE hub_keys (
    key_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL REFERENCES hub_publishers(namespace),
    public_key TEXT NOT NULL,
    label TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL
);
CREATE INDEX hub_keys_namespace ON hub_keys(namespace);
CREATE TABLE hub_releases (
    target TEXT PRIMARY KEY,
    namespace TEXT NOT NULL REFERENCES hub_publishers(namespace),
    package TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    size BIGINT NOT NULL,
    tier TEXT NOT NULL,
    scan TEXT NOT NULL,
    yanked TEXT NOT NULL,
    revoked TEXT NOT NULL,
    published_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX hub_releases_package ON hub_releases(package, created_at);
"#,
    },
    Migration {
        version: 10,
        name: "the Hub: each release's smoke test",
        sql: r#"
ALTER TABLE hub_releases ADD COLUMN smoke TEXT NOT NULL DEFAULT '';
"#,
    },
    Migration {
        version: 11,
        name: "Hub package delivery: bytes delivered for a realm's replicas (billed per GiB)",
        sql: r#"
ALTER TABLE usage_reports ADD COLUMN package_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_rollups ADD COLUMN package_bytes BIGINT NOT NULL DEFAULT 0;
"#,
    },
    Migration {
        version: 12,
        name: "the Hub: certification requests (declared support and SLO, the fee) and reviews",
        sql: r#"
ALTER TABLE hub_releases ADD COLUMN certification TEXT NOT NULL DEFAULT '';
"#,
    },
    Migration {
        version: 13,
        name: "the Hub: uploads no release names yet (per-account quota, collection), and each release's files",
        sql: r#"
CREATE TABLE hub_uploads (
    digest TEXT NOT NULL,
    account_id TEXT NOT NULL,
    size BIGINT NOT NULL,
    uploaded_at BIGINT NOT NULL,
    PRIMARY KEY (digest, account_id)
);
CREATE INDEX hub_uploads_account ON hub_uploads(account_id);
CREATE INDEX hub_uploads_at ON hub_uploads(uploaded_at);
CREATE TABLE hub_release_files (
    target TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (target, digest)
);
CREATE INDEX hub_release_files_digest ON hub_release_files(digest);
"#,
    },
];
