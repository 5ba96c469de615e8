//! `[cluster]`: replicas behind one load balancer, so that a cancel request
//! that reaches the wrong replica is forwarded to the one holding the
//! session. Off unless `peer_id` is set.

use std::collections::HashSet;

use anyhow::bail;
use serde::Deserialize;

/// The largest peer id: ids take 7 bits of each cancel key's secret.
pub const MAX_PEER_ID: u8 = 127;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// This replica's id, 0–127, unique among its peers; unset: no peering.
    pub peer_id: Option<u8>,
    /// The replicas, this one included or not (its own entry is skipped, so
    /// that every replica can share one list).
    #[serde(rename = "peer", default)]
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub id: u8,
    /// `host:port` of the peer's `[listen] address`.
    pub address: String,
}

impl Cluster {
    pub(super) fn validate(&self) -> anyhow::Result<()> {
        let Some(own) = self.peer_id else {
            if !self.peers.is_empty() {
                bail!("[[cluster.peer]] is listed but [cluster] peer_id is not set");
            }
            return Ok(());
        };
        if own > MAX_PEER_ID {
            bail!("[cluster] peer_id must be 0–{MAX_PEER_ID}, not {own}");
        }
        let mut ids = HashSet::new();
        for peer in &self.peers {
            if peer.id > MAX_PEER_ID {
                bail!(
                    "[[cluster.peer]] id must be 0–{MAX_PEER_ID}, not {}",
                    peer.id
                );
            }
            if !ids.insert(peer.id) {
                bail!("[[cluster.peer]] id = {} appears twice", peer.id);
            }
            let port = peer.address.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
            if !matches!(port, Some(Ok(1..))) {
                bail!(
                    "[[cluster.peer]] address = {:?} (id {}) must be host:port",
                    peer.address,
                    peer.id
                );
            }
        }
        Ok(())
    }

    /// The other replicas' addresses by id.
    pub(crate) fn others(&self) -> impl Iterator<Item = &Peer> {
        self.peers
            .iter()
            .filter(move |p| Some(p.id) != self.peer_id)
    }
}
