//! A TCP forwarder in the parent, standing for the address the controllers connect to (a
//! virtual IP or a DNS name): switching its target to another server cuts every connection
//! open through it, as a failover does.

use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Forwards `127.0.0.1:<port>` to a local server's port.
pub struct Forwarder {
    port: u16,
    target: Arc<Mutex<u16>>,
    open: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Forwarder {
    /// Starts forwarding a new local port to `target`.
    pub async fn start(target: u16) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the forwarder");
        let port = listener
            .local_addr()
            .expect("the forwarder's address")
            .port();
        let target = Arc::new(Mutex::new(target));
        let open: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (target, open) = (target.clone(), open.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let to = *target.lock().expect("forwarder lock");
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", to)).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    let mut open = open.lock().expect("forwarder lock");
                    open.retain(|t| !t.is_finished());
                    open.push(task);
                }
            })
        };
        Forwarder {
            port,
            target,
            open,
            accept,
        }
    }

    /// The port the controllers connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends new connections to `to` and cuts the open ones.
    pub fn switch(&self, to: u16) {
        *self.target.lock().expect("forwarder lock") = to;
        for task in self.open.lock().expect("forwarder lock").drain(..) {
            task.abort();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.accept.abort();
        self.switch(0);
    }
}
