//! Streaming replicas of a throwaway server, for the tests of switchover and failover (the
//! replica is promoted with [`TestServer::run_tool`]`("pg_ctl", &["promote", "-w"])`).

use super::embedded::Embedded;
use super::{HarnessError, TestServer, SUPERUSER};

impl TestServer {
    /// Starts a streaming replica of this (embedded, running) server: a new throwaway server
    /// whose data directory is a base backup of this one (`pg_basebackup -R`), following it
    /// as a hot standby on a port of its own. Dropping it stops it and deletes its files.
    /// Blocks; error if external.
    pub fn replica(&self) -> Result<TestServer, HarnessError> {
        let primary = self.throwaway()?;
        let replica = Embedded::start(primary.binaries.clone(), |replica| {
            let mut command = replica.command("pg_basebackup");
            command
                .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
                .args(["-U", SUPERUSER])
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-D"])
                .arg(&replica.data_dir);
            replica.run(command).map(drop)
        })?;
        Ok(TestServer::embedded(replica))
    }
}
