//! Versioned schema migrations. Each entry runs once, in order, inside a
//! transaction that also records its version in `schema_version`.

/// Migrations in order; the index + 1 is the schema version.
pub const MIGRATIONS: &[&str] = &[
    // 1: tenants, credentials, fleet, servers, phones, jobs.
    r#"
CREATE TABLE projects (
    project_id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    create_time TEXT NOT NULL
);
CREATE TABLE credentials (
    access_key TEXT PRIMARY KEY,
    secret_key TEXT NOT NULL,
    project_id TEXT NOT NULL REFERENCES projects(project_id),
    create_time TEXT NOT NULL
);
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    salt TEXT NOT NULL,
    project_id TEXT NOT NULL REFERENCES projects(project_id)
);
CREATE TABLE tokens (
    token TEXT PRIMARY KEY,
    user_name TEXT NOT NULL,
    project_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    agent_url TEXT NOT NULL,
    server_model TEXT NOT NULL,
    server_ip TEXT NOT NULL,
    public_ip TEXT,
    phone_capacity INTEGER NOT NULL,
    inventory TEXT NOT NULL,
    last_seen INTEGER NOT NULL,
    alive INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE servers (
    server_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    node_id TEXT NOT NULL UNIQUE REFERENCES nodes(node_id),
    seq INTEGER NOT NULL,
    server_name TEXT NOT NULL,
    server_model_name TEXT NOT NULL,
    phone_model_name TEXT NOT NULL,
    image_id TEXT NOT NULL,
    keypair_name TEXT NOT NULL DEFAULT '',
    status INTEGER NOT NULL,
    network_version TEXT NOT NULL,
    order_id TEXT NOT NULL,
    product_id TEXT NOT NULL,
    vpc_id TEXT NOT NULL DEFAULT '',
    subnet_id TEXT NOT NULL DEFAULT '',
    vpc_cidr TEXT NOT NULL DEFAULT '',
    subnet_cidr TEXT NOT NULL DEFAULT '',
    availability_zone TEXT NOT NULL DEFAULT '',
    ports TEXT NOT NULL DEFAULT '[]',
    band_width_id TEXT NOT NULL DEFAULT '',
    create_dispatched INTEGER NOT NULL DEFAULT 0,
    create_request TEXT NOT NULL DEFAULT '',
    create_time TEXT NOT NULL,
    update_time TEXT NOT NULL
);
CREATE INDEX servers_by_project ON servers(project_id, seq DESC);
CREATE TABLE phones (
    phone_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    server_id TEXT NOT NULL REFERENCES servers(server_id),
    seq INTEGER NOT NULL,
    phone_name TEXT NOT NULL,
    phone_model_name TEXT NOT NULL,
    image_id TEXT NOT NULL,
    status INTEGER NOT NULL,
    type INTEGER NOT NULL DEFAULT 0,
    slot INTEGER NOT NULL,
    property TEXT NOT NULL DEFAULT '{}',
    access_infos TEXT NOT NULL DEFAULT '[]',
    traffic_type TEXT NOT NULL DEFAULT 'direct',
    create_time TEXT NOT NULL,
    update_time TEXT NOT NULL
);
CREATE INDEX phones_by_project ON phones(project_id, seq DESC);
CREATE INDEX phones_by_server ON phones(server_id, slot);
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    project_id TEXT NOT NULL,
    server_id TEXT NOT NULL,
    phone_id TEXT,
    node_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    request TEXT NOT NULL,
    status INTEGER NOT NULL,
    dispatched INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    error_msg TEXT,
    execute_msg TEXT,
    begin_time TEXT NOT NULL,
    end_time TEXT
);
CREATE INDEX jobs_by_request ON jobs(project_id, request_id, seq);
CREATE INDEX jobs_pending ON jobs(status, dispatched);
CREATE TABLE bandwidths (
    band_width_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    band_width_name TEXT NOT NULL,
    band_width_size INTEGER NOT NULL,
    band_width_share_type INTEGER NOT NULL,
    band_width_charge_mode INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    create_time TEXT NOT NULL,
    update_time TEXT NOT NULL
);
CREATE TABLE keypairs (
    project_id TEXT NOT NULL,
    keypair_name TEXT NOT NULL,
    public_key TEXT NOT NULL,
    PRIMARY KEY (project_id, keypair_name)
);
CREATE TABLE sync_shell_calls (
    project_id TEXT NOT NULL,
    at INTEGER NOT NULL
);
"#,
    // 2: the encoding server's status as its agent reports it (the
    // reference's codes; 0 until the first report).
    r#"
ALTER TABLE servers ADD COLUMN encoder_status INTEGER NOT NULL DEFAULT 0;
"#,
    // 3: revision counters of each project's phones, moved by triggers so
    // that every writer (another process, a later replica) invalidates the
    // remembered positions of deep listings: `members` when phones come,
    // go or change order, `attrs` when a filtered field changes.
    r#"
CREATE TABLE phone_list_rev (
    project_id TEXT PRIMARY KEY,
    members INTEGER NOT NULL DEFAULT 0,
    attrs INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER phones_rev_insert AFTER INSERT ON phones BEGIN
    INSERT INTO phone_list_rev (project_id, members) VALUES (NEW.project_id, 1)
    ON CONFLICT (project_id) DO UPDATE SET members = members + 1;
END;
CREATE TRIGGER phones_rev_delete AFTER DELETE ON phones BEGIN
    INSERT INTO phone_list_rev (project_id, members) VALUES (OLD.project_id, 1)
    ON CONFLICT (project_id) DO UPDATE SET members = members + 1;
END;
CREATE TRIGGER phones_rev_move AFTER UPDATE OF project_id, seq ON phones
WHEN OLD.project_id IS NOT NEW.project_id OR OLD.seq IS NOT NEW.seq BEGIN
    INSERT INTO phone_list_rev (project_id, members) VALUES (OLD.project_id, 1)
    ON CONFLICT (project_id) DO UPDATE SET members = members + 1;
    INSERT INTO phone_list_rev (project_id, members) VALUES (NEW.project_id, 1)
    ON CONFLICT (project_id) DO UPDATE SET members = members + 1;
END;
CREATE TRIGGER phones_rev_attrs AFTER UPDATE OF phone_name, server_id, status, type ON phones
WHEN OLD.phone_name IS NOT NEW.phone_name OR OLD.server_id IS NOT NEW.server_id
    OR OLD.status IS NOT NEW.status OR OLD.type IS NOT NEW.type BEGIN
    INSERT INTO phone_list_rev (project_id, attrs) VALUES (NEW.project_id, 1)
    ON CONFLICT (project_id) DO UPDATE SET attrs = attrs + 1;
END;
"#,
    // 4: a server's jobs by status (a server with a running deletion job is
    // being deleted; its deletion waits for the jobs before it).
    r#"
CREATE INDEX jobs_by_server ON jobs(server_id, status);
"#,
    // 5: resource tags (the TMS-style tag API; resources are servers).
    r#"
CREATE TABLE tags (
    project_id TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (resource_type, resource_id, key)
);
CREATE INDEX tags_by_project ON tags(project_id, resource_type, key);
"#,
    // 6: the shared applications each host's agent last reported, and when.
    r#"
ALTER TABLE nodes ADD COLUMN share_apps TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN share_apps_time TEXT NOT NULL DEFAULT '';
"#,
    // 7: custom images made from phones (their rootfs tar in the object
    // store), and the projects each is shared with.
    r#"
CREATE TABLE images (
    image_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    image_name TEXT NOT NULL,
    base_image_id TEXT NOT NULL,
    image_label TEXT NOT NULL,
    os_type TEXT NOT NULL,
    os_name TEXT NOT NULL,
    url TEXT NOT NULL,
    status INTEGER NOT NULL,
    image_size INTEGER NOT NULL DEFAULT 0,
    create_ms INTEGER NOT NULL,
    update_ms INTEGER NOT NULL
);
CREATE INDEX images_by_project ON images(project_id, create_ms);
CREATE TABLE image_members (
    image_id TEXT NOT NULL REFERENCES images(image_id) ON DELETE CASCADE,
    member_id TEXT NOT NULL,
    status TEXT NOT NULL,
    create_ms INTEGER NOT NULL,
    update_ms INTEGER NOT NULL,
    PRIMARY KEY (image_id, member_id)
);
CREATE INDEX image_members_by_member ON image_members(member_id);
"#,
    // 8: scheduled events: host maintenance the operator announces and the
    // server's project authorizes (times in ms; `stopped_phones` the phones
    // the event stopped, started again when it completes).
    r#"
CREATE TABLE scheduled_events (
    event_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    server_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state TEXT NOT NULL,
    authorization_type TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    publish_ms INTEGER NOT NULL,
    not_before_deadline_ms INTEGER NOT NULL,
    not_before_ms INTEGER,
    start_ms INTEGER,
    finish_ms INTEGER,
    stopped_phones TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX scheduled_events_by_project ON scheduled_events(project_id, publish_ms);
"#,
    // 9: a host a server was switched away from keeps that server's phones
    // until its agent has deleted them (the job `release_job`); it is not
    // free to buy until then.
    r#"
ALTER TABLE nodes ADD COLUMN releasing_server TEXT;
ALTER TABLE nodes ADD COLUMN release_job TEXT;
"#,
    // 10: a host the operator keeps out of sale (maintenance without a
    // server on it, or before it leaves the fleet).
    r#"
ALTER TABLE nodes ADD COLUMN cordoned INTEGER NOT NULL DEFAULT 0;
"#,
    // 11: share file systems the operator offers a project: a directory of
    // every host (where the file system is mounted); those attached to each
    // server (with the directory bound), which a switch takes along.
    r#"
CREATE TABLE share_filesystems (
    fs_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    create_time TEXT NOT NULL
);
CREATE TABLE server_share_filesystems (
    server_id TEXT NOT NULL,
    fs_id TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (server_id, fs_id)
);
"#,
    // 12: the mapped ports of a server's encoding server, as its agent
    // reports them (`cph_agent::protocol::AccessInfo` list).
    r#"
ALTER TABLE servers ADD COLUMN encoder_access_infos TEXT NOT NULL DEFAULT '[]';
"#,
    // 13: tokens are kept as their SHA-256 from now on; the ones issued
    // before were kept as they are and are dropped (they last a day: their
    // users ask for new ones).
    r#"
DELETE FROM tokens;
"#,
    // 14: the host a scheduled event is about (its server's when it was
    // announced): an event whose server has left that host is canceled.
    r#"
ALTER TABLE scheduled_events ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
"#,
];
