//! One generation of the agent's control plane, proportional to the change: the memoised model,
//! plan and map contents (`control::memo`), which Service ports fit in the maps
//! ([`capacity::Tally`], and [`capacity::fit_desired`] only when they do not all fit), and the
//! sync of the frontends that may have changed. The agent's loop and the control-plane
//! benchmark both run it.
use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::Result;

use super::{
    capacity::{fit_desired, MapSizes, Tally},
    sync::{SyncStats, Syncer},
    Dataplane,
};
use crate::control::{
    desired::{Desired, FrontendKey},
    memo::Memo,
    model::{Checks, NodeInfo, Rejected},
    plan::{Plan, ServicePortPlan},
    source::Objects,
};

/// The control plane kept between snapshots (see the module documentation).
pub struct ControlPlane {
    memo: Memo,
    tally: Tally,
    sizes: MapSizes,
    /// When not every Service port fits: the fitted plan and its map contents.
    over: Option<(Plan, Desired)>,
    not_fitting: Vec<Rejected>,
    /// Frontends whose map contents may differ from what the last successful sync wrote.
    touched: BTreeSet<FrontendKey>,
    /// The next sync compares every frontend (the first, after a fit, after a failure).
    compare_all: bool,
}

impl ControlPlane {
    pub fn new(node_name: &str, checks: Checks, sizes: MapSizes) -> Self {
        Self {
            memo: Memo::new(node_name, checks),
            tally: Tally::default(),
            sizes,
            over: None,
            not_fitting: Vec::new(),
            touched: BTreeSet::new(),
            compare_all: true,
        }
    }

    /// Takes the next snapshot: recomputes what it changed and which Service ports fit.
    /// Returns the snapshot it replaced, for the caller to free when it suits it.
    #[must_use = "the replaced snapshot: free it (off the loop's thread when large)"]
    pub fn update(&mut self, objects: Objects) -> Objects {
        let mut u = self.memo.update(objects);
        let replaced = std::mem::take(&mut u.replaced);
        if u.everything {
            self.tally = Tally::default();
            for port in self.memo.all_frontends() {
                self.tally.add(port);
            }
            self.compare_all = true;
        } else {
            for port in &u.gone {
                self.tally.remove(port);
            }
            for k in &u.planned {
                for port in self.memo.frontends_of(k) {
                    self.tally.add(port);
                }
            }
            self.touched.extend(u.touched);
        }
        if self.tally.fits(&self.sizes) {
            if self.over.take().is_some() {
                self.compare_all = true;
            }
            self.not_fitting.clear();
        } else {
            let mut plan = self.memo.plan();
            let (desired, not_fitting) = fit_desired(&mut plan, &self.sizes);
            self.over = Some((plan, desired));
            self.not_fitting = not_fitting;
            self.compare_all = true;
        }
        replaced
    }

    /// Brings the maps to [`ControlPlane::desired`]: only the frontends that may have changed
    /// since the last successful sync are compared, unless everything must be.
    pub fn sync<D: Dataplane>(&mut self, syncer: &mut Syncer<D>) -> Result<SyncStats> {
        let desired = match &self.over {
            Some((_, d)) => d,
            None => self.memo.desired(),
        };
        let stats = if self.compare_all {
            syncer.sync(desired)
        } else {
            syncer.sync_touched(desired, &self.touched)
        };
        if stats.is_ok() {
            self.compare_all = false;
            self.touched.clear();
        } else {
            self.compare_all = true;
        }
        stats
    }

    /// What the maps should hold (of the Service ports that fit).
    pub fn desired(&self) -> &Desired {
        match &self.over {
            Some((_, d)) => d,
            None => self.memo.desired(),
        }
    }

    /// The IPv4 Service ports that fit, in plan order.
    pub fn port_plans(&self) -> Box<dyn Iterator<Item = &ServicePortPlan<Ipv4Addr>> + '_> {
        match &self.over {
            Some((p, _)) => Box::new(p.services.iter()),
            None => Box::new(self.memo.port_plans()),
        }
    }

    /// The ClusterIPs of the Service ports that fit (as `Plan::cluster_ips`).
    pub fn cluster_ips(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.port_plans()
            .flat_map(|sp| &sp.frontends)
            .filter(|f| f.kind == crate::control::plan::FrontendKind::ClusterIP)
            .map(|f| *f.address.ip())
    }

    /// The Service ports the maps have no room for (oldest Services first keep theirs).
    pub fn not_fitting(&self) -> &[Rejected] {
        &self.not_fitting
    }

    /// The node the plans are made for.
    pub fn node(&self) -> &NodeInfo {
        self.memo.node()
    }

    pub fn memo(&self) -> &Memo {
        &self.memo
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        control::{desired::desired, model, plan, source::parse_into},
        dataplane::{capacity::fit, fake::FakeDataplane},
    };

    fn cluster(n: usize, endpoints: usize) -> Objects {
        let mut text = String::from(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.1}]}\n",
        );
        for i in 0..n {
            let np = if i % 4 == 0 {
                format!(", nodePort: {}", 30000 + i)
            } else {
                String::new()
            };
            let ty = if i % 4 == 0 { "NodePort" } else { "ClusterIP" };
            text += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns, creationTimestamp: \"2026-01-01T00:00:{:02}Z\"}}\nspec: {{type: {ty}, clusterIP: 10.96.{}.{}, ports: [{{name: p, port: 80, targetPort: 8080{np}}}]}}\n",
                i % 60,
                i / 250,
                i % 250 + 1
            );
            text += &format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-x, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints:\n"
            );
            for e in 0..endpoints {
                text += &format!(
                    "- {{addresses: [10.{}.{}.{}], nodeName: n2}}\n",
                    40 + i / 250,
                    i % 250,
                    e + 1
                );
            }
        }
        let mut o = Objects::default();
        parse_into(std::path::Path::new("c.yaml"), &text, &mut o).unwrap();
        o
    }

    /// Through changes that make the maps too small and big enough again, the control plane's
    /// map contents and rejections are those of a from-scratch fit, and the maps the sync
    /// writes hold exactly them.
    #[test]
    fn fits_and_syncs_like_from_scratch() {
        let mut o = cluster(30, 3);
        // Room for 20 Service ports' backends (3 each), not for 30.
        let sizes = MapSizes {
            backends: 62,
            ..MapSizes::default()
        };
        let mut cp = ControlPlane::new("n1", Checks::default(), sizes);
        let mut syncer = Syncer::adopt(FakeDataplane::default()).unwrap();
        syncer.set_sizes(sizes);
        let mut check = |cp: &mut ControlPlane, o: &Objects, step: &str| {
            drop(cp.update(o.clone()));
            let m = model::build(o, "n1");
            let mut p = plan::plan(&m, "n1");
            let rejected = fit(&mut p, &sizes);
            assert_eq!(cp.not_fitting(), rejected.as_slice(), "{step}");
            assert_eq!(cp.desired(), &desired(&p), "{step}");
            assert!(cp.port_plans().eq(p.services.iter()), "{step}");
            let st = cp.sync(&mut syncer).unwrap();
            assert!(st.deferred.is_empty(), "{step}");
            // A full comparison finds nothing left to write.
            assert_eq!(syncer.sync(cp.desired()).unwrap().writes, 0, "{step}");
        };
        check(&mut cp, &o, "too many");
        o.endpoint_slices.truncate(15);
        check(&mut cp, &o, "15 Services with endpoints: all fit");
        let s = &mut o.endpoint_slices[3];
        s.endpoints.as_mut().unwrap()[0].addresses = vec!["10.99.0.1".into()];
        check(&mut cp, &o, "one endpoint replaced");
        let more = cluster(30, 3);
        o.endpoint_slices = more.endpoint_slices;
        check(&mut cp, &o, "too many again");
    }
}
