BEGIN TRANSACTION;
CREATE TABLE blocks (
	block_id BLOB NOT NULL, 
	pack_id VARCHAR(64) NOT NULL, 
	"offset" BIGINT NOT NULL, 
	length INTEGER NOT NULL, 
	PRIMARY KEY (block_id)
);
INSERT INTO "blocks" VALUES(X'0101010101010101010101010101010101010101010101010101010101010101','p1',0,100);
CREATE TABLE disk_state (
	server_id VARCHAR(40) NOT NULL, 
	disk_key INTEGER NOT NULL, 
	disk_uuid VARCHAR(64), 
	capacity BIGINT NOT NULL, 
	change_id VARCHAR(128), 
	last_run_id VARCHAR(64) NOT NULL, 
	chain_length INTEGER NOT NULL, 
	PRIMARY KEY (server_id, disk_key)
);
INSERT INTO "disk_state" VALUES('s-7e555d2007cb4aae',2000,'u',1048576,'52 de/4','r-0',1);
CREATE TABLE jobs (
	id VARCHAR(40) NOT NULL, 
	server_id VARCHAR(40) NOT NULL, 
	state VARCHAR(24) NOT NULL, 
	paused BOOLEAN NOT NULL, 
	seed_time VARCHAR(40) NOT NULL, 
	frequency_hours INTEGER, 
	retention INTEGER NOT NULL, 
	description TEXT NOT NULL, 
	consecutive_failures INTEGER NOT NULL, 
	message TEXT NOT NULL, 
	created_at VARCHAR(32) NOT NULL, 
	updated_at VARCHAR(32) NOT NULL, 
	retention_due VARCHAR(40), 
	retention_attempts INTEGER DEFAULT '0' NOT NULL, 
	retention_next_at VARCHAR(40), 
	retention_error TEXT, 
	PRIMARY KEY (id)
);
INSERT INTO "jobs" VALUES('j-503e74705648','s-7e555d2007cb4aae','PENDING',0,'2026-01-01T00:00:00Z',12,3,'old',0,'','2026-12-01T12:43:43.962700Z','2026-12-01T12:43:43.962700Z',NULL,0,NULL,NULL);
CREATE TABLE packs (
	id VARCHAR(64) NOT NULL, 
	size BIGINT NOT NULL, 
	run_id VARCHAR(64), 
	created_at VARCHAR(32) NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "packs" VALUES('p1',100,'r-20260101T000000Z-0001','2026-12-01T12:43:43.971054Z');
CREATE TABLE retention (
	server_id VARCHAR(40) NOT NULL, 
	keep INTEGER NOT NULL, 
	updated_at VARCHAR(32) NOT NULL, 
	PRIMARY KEY (server_id)
);
INSERT INTO "retention" VALUES('s-7e555d2007cb4aae',5,'2026-12-01T12:43:43.973749Z');
CREATE TABLE run_control (
	run_id VARCHAR(64) NOT NULL, 
	job_id VARCHAR(40), 
	seq INTEGER NOT NULL, 
	attempts INTEGER NOT NULL, 
	host TEXT, 
	failed_stage VARCHAR(32), 
	failure TEXT, 
	progress_done BIGINT NOT NULL, 
	progress_total BIGINT NOT NULL, 
	detail TEXT NOT NULL, 
	updated_at VARCHAR(32) NOT NULL, 
	PRIMARY KEY (run_id)
);
INSERT INTO "run_control" VALUES('r-20260101T000000Z-0001','j-503e74705648',1,0,'esx1',NULL,NULL,0,0,'','2026-12-01T12:43:43.966554Z');
CREATE TABLE run_disks (
	run_id VARCHAR(64) NOT NULL, 
	disk_key INTEGER NOT NULL, 
	mode VARCHAR(16) NOT NULL, 
	reason TEXT, 
	capacity BIGINT NOT NULL, 
	change_id_from VARCHAR(128), 
	change_id_to VARCHAR(128), 
	bytes_changed BIGINT NOT NULL, 
	bytes_read BIGINT NOT NULL, 
	bytes_uploaded BIGINT NOT NULL, 
	blocks_new INTEGER NOT NULL, 
	blocks_dedup INTEGER NOT NULL, 
	blocks_zero INTEGER NOT NULL, 
	manifest_key TEXT, 
	disk_uuid VARCHAR(64), 
	pack_bytes BIGINT DEFAULT '0' NOT NULL, 
	packs INTEGER DEFAULT '0' NOT NULL, 
	chain INTEGER DEFAULT '0' NOT NULL, 
	merkle_root VARCHAR(64), 
	PRIMARY KEY (run_id, disk_key)
);
CREATE TABLE run_steps (
	run_id VARCHAR(64) NOT NULL, 
	stage VARCHAR(32) NOT NULL, 
	disk_key INTEGER NOT NULL, 
	result TEXT NOT NULL, 
	done_at VARCHAR(32) NOT NULL, 
	PRIMARY KEY (run_id, stage, disk_key)
);
INSERT INTO "run_steps" VALUES('r-20260101T000000Z-0001','validate',-1,'{"ok": true}','2026-12-01T12:43:43.968159Z');
CREATE TABLE runs (
	id VARCHAR(64) NOT NULL, 
	server_id VARCHAR(40) NOT NULL, 
	type VARCHAR(16) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	stage VARCHAR(32) NOT NULL, 
	started_at VARCHAR(32) NOT NULL, 
	finished_at VARCHAR(32), 
	error TEXT, 
	snapshot_name VARCHAR(128), 
	snapshot_ref VARCHAR(64), 
	stats TEXT NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "runs" VALUES('r-20260101T000000Z-0001','s-7e555d2007cb4aae','AUTOMATIC','ACTIVE','validate','2026-12-01T12:43:43.964137Z',NULL,NULL,NULL,NULL,'{}');
CREATE TABLE servers (
	id VARCHAR(40) NOT NULL, 
	vm_uuid VARCHAR(64) NOT NULL, 
	name TEXT NOT NULL, 
	ref VARCHAR(64) NOT NULL, 
	datacenter TEXT NOT NULL, 
	power_state VARCHAR(32) NOT NULL, 
	cbt_enabled BOOLEAN NOT NULL, 
	disks TEXT NOT NULL, 
	snapshots TEXT NOT NULL, 
	seen_at VARCHAR(32) NOT NULL, 
	removed_at VARCHAR(32), 
	PRIMARY KEY (id), 
	UNIQUE (vm_uuid)
);
INSERT INTO "servers" VALUES('s-7e555d2007cb4aae','4200-aaaa','web-01','vm-1','dc','poweredOn',1,'[{"key": 2000, "label": "Hard disk 1", "capacity": 1048576, "backing": "b1", "cbt": true}]','[]','2026-12-01T12:43:43.959041Z',NULL);
CREATE TABLE side_effects (
	id INTEGER NOT NULL, 
	run_id VARCHAR(64), 
	kind VARCHAR(16) NOT NULL, 
	target TEXT NOT NULL, 
	name TEXT, 
	ref TEXT, 
	detail TEXT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	created_at VARCHAR(32) NOT NULL, 
	updated_at VARCHAR(32) NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "side_effects" VALUES(1,'r-20260101T000000Z-0001','snapshot','4200-aaaa','connector-r-1',NULL,'{}','pending','2026-12-01T12:43:43.969629Z','2026-12-01T12:43:43.969629Z');
INSERT INTO "side_effects" VALUES(2,NULL,'multipart','packs/ab',NULL,'up-1','{}','pending','2026-12-01T12:43:43.970497Z','2026-12-01T12:43:43.970497Z');
CREATE INDEX ix_runs_server_id ON runs (server_id);
CREATE INDEX ix_run_control_job_id ON run_control (job_id);
CREATE INDEX ix_side_effects_run_id ON side_effects (run_id);
CREATE INDEX ix_jobs_server_id ON jobs (server_id);
COMMIT;
