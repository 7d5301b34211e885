//! The Hub (issue 15): signed, content-addressed packages.
//!
//! Built so far:
//! - `package.rs` a package's manifest (the seed's `beemesh.yaml` shape plus the artifacts it
//!   carries and the workload it deploys), checked with a path for every problem;
//! - `digest.rs` content addressing (SHA-256, `sha256:<hex>`), streamed and bounded;
//! - `store.rs` blobs by digest behind one trait (`BlobStore`), on the filesystem (`FsStore`):
//!   nothing half-visible, bounded uploads, verified reads.
//!
//! To come (see `docs/design/hub.md`): the TUF repository (through `tough`) with a delegation per
//! publisher, attestations (SBOM, in-toto provenance in DSSE), the submission pipeline and tiers,
//! distribution over the mesh, offline bundles, revocation.

pub mod digest;
pub mod package;
pub mod store;

pub use digest::Digest;
pub use package::{parse, FieldError, Package};
pub use store::{BlobStore, FsStore, StoreError};
