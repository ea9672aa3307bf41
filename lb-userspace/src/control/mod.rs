//! The control plane: Kubernetes objects → [`model`] → [`plan`] → [`desired`] map contents.
//!
//! Pure and without aya: it never touches a map, so all of it runs in unit tests and fuzz
//! targets. [`source`] and [`kube_source`] are the only modules that know where objects come
//! from (a manifests path or the Kubernetes API); the dataplane only ever sees [`desired::Desired`].
pub mod desired;
pub mod kube_source;
pub mod memo;
pub mod model;
pub mod plan;
pub mod source;
