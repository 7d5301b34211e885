//! Routes of the Hub: publishers and keys, blobs, publishing, yank and revoke, search, trust.
//! The TUF repository itself is served as files under `/v1/hub/tuf/` ([`tuf_file`]; outside
//! the OpenAPI document: it is TUF's layout, `metadata/…` and `targets/…`).

#[allow(unused_imports)]
use crate::http::*;
use crate::hub::types::*;

/// Create a publisher for a namespace (an account with a verified email).
///
/// Verified at once when the owner's address is at a domain named like the namespace
/// (`x@acme.com` for `acme`, not a free-mail domain); otherwise a platform operator approves it.
#[utoipa::path(post, path = "/v1/hub/publishers", tag = "hub", security(("session" = [])),
    request_body = NewPublisher,
    responses((status = 201, body = Publisher, description = "The publisher."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 409, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn create_publisher(
    State(reg): Reg,
    actor: Actor,
    Body(req): Body<NewPublisher>,
) -> ApiResult<(StatusCode, Json<Publisher>)> {
    Ok((
        StatusCode::CREATED,
        Json(reg.create_publisher(&actor, req).await?),
    ))
}

/// A publisher, its verification and its keys.
#[utoipa::path(get, path = "/v1/hub/publishers/{namespace}", tag = "hub",
    params(("namespace" = String, Path, description = "The publisher's namespace.")),
    responses((status = 200, body = Publisher, description = "The publisher."),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn show_publisher(
    State(reg): Reg,
    Path(ns): Path<String>,
) -> ApiResult<Json<Publisher>> {
    Ok(Json(reg.show_publisher(&ns).await?))
}

/// Approve a publisher's identity (platform operators).
#[utoipa::path(post, path = "/v1/hub/publishers/{namespace}/approve", tag = "hub", security(("session" = [])),
    params(("namespace" = String, Path, description = "The publisher's namespace.")),
    responses((status = 200, body = Publisher, description = "Verified."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn approve_publisher(
    State(reg): Reg,
    actor: Actor,
    Path(ns): Path<String>,
) -> ApiResult<Json<Publisher>> {
    Ok(Json(reg.approve_publisher(&actor, &ns).await?))
}

/// Register a signing key (the publisher's owner). It joins the publisher's TUF delegation.
#[utoipa::path(post, path = "/v1/hub/publishers/{namespace}/keys", tag = "hub", security(("session" = [])),
    params(("namespace" = String, Path, description = "The publisher's namespace.")),
    request_body = NewPublisherKey,
    responses((status = 201, body = PublisherKey, description = "The key."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 409, response = ErrorBody),
        (status = 422, response = ErrorBody)))]
pub(crate) async fn add_publisher_key(
    State(reg): Reg,
    actor: Actor,
    Path(ns): Path<String>,
    Body(req): Body<NewPublisherKey>,
) -> ApiResult<(StatusCode, Json<PublisherKey>)> {
    Ok((
        StatusCode::CREATED,
        Json(reg.add_publisher_key(&actor, &ns, req).await?),
    ))
}

/// Revoke a signing key (its owner or an operator): it signs nothing from now on, and a role
/// the publisher's other keys do not sign leaves the repository until re-signed.
#[utoipa::path(delete, path = "/v1/hub/publishers/{namespace}/keys/{key_id}", tag = "hub", security(("session" = [])),
    params(("namespace" = String, Path, description = "The publisher's namespace."),
        ("key_id" = String, Path, description = "The key's TUF id.")),
    responses((status = 200, body = PublisherKey, description = "Revoked."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn revoke_publisher_key(
    State(reg): Reg,
    actor: Actor,
    Path((ns, key_id)): Path<(String, String)>,
) -> ApiResult<Json<PublisherKey>> {
    Ok(Json(reg.revoke_publisher_key(&actor, &ns, &key_id).await?))
}

/// The publisher's current signed TUF role (null before its first publish), to add to and
/// re-sign.
#[utoipa::path(get, path = "/v1/hub/publishers/{namespace}/role", tag = "hub",
    params(("namespace" = String, Path, description = "The publisher's namespace.")),
    responses((status = 200, description = "The role, as signed.", content_type = "application/json"),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn publisher_role(
    State(reg): Reg,
    Path(ns): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(reg.publisher_role(&ns).await?))
}

/// Publish: the publisher's next signed role, with the index of each new version.
///
/// Each new version passes review (manifest, files uploaded, capabilities, resources, no
/// secret, SBOM, provenance, scan); the role must be signed by the publisher's keys, be the
/// next version, stay in its namespace and leave published versions unchanged.
#[utoipa::path(post, path = "/v1/hub/publishers/{namespace}/releases", tag = "hub", security(("session" = [])),
    params(("namespace" = String, Path, description = "The publisher's namespace.")),
    request_body = Publish,
    responses((status = 201, body = Published, description = "Published."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 409, response = ErrorBody),
        (status = 422, response = ErrorBody)))]
pub(crate) async fn publish(
    State(reg): Reg,
    actor: Actor,
    Path(ns): Path<String>,
    body: axum::body::Body,
) -> ApiResult<(StatusCode, Json<Published>)> {
    // A role lists every version a publisher has: larger than `registry.max_body` allows.
    let limit = 2 * macula_hub::tuf::MAX_ROLE_BYTES + 16 * macula_hub::review::MAX_INDEX as usize;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("a publish request may be {limit} bytes"),
        )
    })?;
    let req: Publish = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid("invalid_body", format!("the request body: {e}")))?;
    let published = reg.publish(&actor, &ns, req).await?;
    // The pipeline's last step runs after the answer: the smoke test on the mesh.
    for r in &published.added {
        let (reg, target) = (reg.clone(), r.target.clone());
        tokio::spawn(async move {
            if let Err(e) = reg.smoke_release(&target).await {
                tracing::warn!("hub: smoke test of {target}: {}", e.message);
            }
        });
    }
    Ok((StatusCode::CREATED, Json(published)))
}

/// Upload a blob (a file of a package) by its digest; kept only if its bytes are that digest.
#[utoipa::path(put, path = "/v1/hub/blobs/{digest}", tag = "hub", security(("session" = [])),
    params(("digest" = String, Path, description = "`sha256:<hex>`.")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = Blob, description = "Stored (or already there)."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 413, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn put_blob(
    State(reg): Reg,
    actor: Actor,
    Path(digest): Path<String>,
    body: axum::body::Body,
) -> ApiResult<Json<Blob>> {
    Ok(Json(reg.put_blob(&actor, &digest, body).await?))
}

/// Download a blob by digest.
#[utoipa::path(get, path = "/v1/hub/blobs/{digest}", tag = "hub",
    params(("digest" = String, Path, description = "`sha256:<hex>`.")),
    responses((status = 200, description = "The bytes.", content_type = "application/octet-stream"),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn get_blob(State(reg): Reg, Path(digest): Path<String>) -> ApiResult<Response> {
    let hub = reg.hub()?;
    let d: macula_hub::Digest = digest.parse().map_err(|e: macula_hub::digest::BadDigest| {
        ApiError::invalid("invalid_digest", e.to_string())
    })?;
    let not_found = || ApiError::not_found(format!("no blob {d}"));
    let (len, body) = match hub.store.local_path(&d) {
        // A file: streamed from disk as it is.
        Some(path) => {
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|_| not_found())?;
            let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
            (
                len,
                axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file)),
            )
        }
        // A remote store: its reader (verified as it streams: a corrupt object ends the
        // download with an error, never a clean end) passed on chunk by chunk.
        None => {
            let store = hub.store.clone();
            let opened = tokio::task::spawn_blocking(move || {
                let len = store.size(&d)?;
                Ok::<_, macula_hub::StoreError>(len.zip(store.open(&d)?))
            })
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?;
            let (len, mut reader) = opened.ok_or_else(not_found)?;
            let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<axum::body::Bytes>>(4);
            tokio::task::spawn_blocking(move || {
                use std::io::Read;
                // Each chunk is sent once the next read succeeds: the last one only once the
                // reader has verified the whole (a corrupt object is never served complete).
                let mut buf = vec![0u8; 256 * 1024];
                let mut held: Option<axum::body::Bytes> = None;
                loop {
                    let next = match reader.read(&mut buf) {
                        Ok(0) => None,
                        Ok(n) => Some(Ok(axum::body::Bytes::copy_from_slice(&buf[..n]))),
                        Err(e) => Some(Err(e)),
                    };
                    match next {
                        Some(Ok(chunk)) => {
                            if let Some(h) = held.replace(chunk) {
                                if tx.blocking_send(Ok(h)).is_err() {
                                    break;
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!("hub: serving a blob: {e}");
                            let _ = tx.blocking_send(Err(e));
                            break;
                        }
                        None => {
                            if let Some(h) = held.take() {
                                let _ = tx.blocking_send(Ok(h));
                            }
                            break;
                        }
                    }
                }
            });
            (len, axum::body::Body::from_stream(tokio_stream_of(rx)))
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

/// The items a channel receives, as a stream (a response body fed by a blocking reader).
fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Search packages by name.
#[utoipa::path(get, path = "/v1/hub/packages", tag = "hub", params(Search),
    responses((status = 200, body = Vec<PackageSummary>, description = "Packages, by name.")))]
pub(crate) async fn search_packages(
    State(reg): Reg,
    Q(s): Q<Search>,
) -> ApiResult<Json<Vec<PackageSummary>>> {
    Ok(Json(reg.search_packages(&s).await?))
}

/// A package and every version of it, newest first, with tier, scan, yank and revocation.
#[utoipa::path(get, path = "/v1/hub/packages/{namespace}/{name}", tag = "hub",
    params(("namespace" = String, Path, description = "The publisher's namespace."),
        ("name" = String, Path, description = "The package's name.")),
    responses((status = 200, body = PackageInfo, description = "The package."),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn package_info(
    State(reg): Reg,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<Json<PackageInfo>> {
    Ok(Json(reg.package_info(&format!("{ns}/{name}")).await?))
}

/// Yank, revoke, ask for certification of, or certify a release.
///
/// `yank` (its publisher's owner or an operator): hidden from new installs, still installable by
/// digest (deployments that pinned it keep working). `revoke` (the same): installable nowhere,
/// and running replicas of it are flagged. `request-certification` (its publisher's owner):
/// `reason` declares the vendor's support and SLO, and the certification fee is accepted (it is
/// in the answer's `certification`). `certify` (operators): a Verified release whose publisher
/// asked becomes Certified (`reason` says what was reviewed), and the fee is charged to the
/// publisher's owner. `retest` (its publisher's owner or an operator): the release's SBOM is
/// scanned against the Hub's current vulnerability database and its smoke test runs again
/// (`reason` is not used), the tier following the result.
#[utoipa::path(post, path = "/v1/hub/releases/{namespace}/{release}/{action}", tag = "hub", security(("session" = [])),
    params(("namespace" = String, Path, description = "The publisher's namespace."),
        ("release" = String, Path, description = "`<name>@<version>`."),
        ("action" = String, Path, description = "`yank`, `revoke`, `retest`, `request-certification` or `certify`.")),
    request_body = Reason,
    responses((status = 200, body = Release, description = "Yanked or revoked."),
        (status = 401, response = ErrorBody), (status = 403, response = ErrorBody),
        (status = 404, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn mark_release(
    State(reg): Reg,
    actor: Actor,
    Path((ns, rel, action)): Path<(String, String, String)>,
    Body(req): Body<Reason>,
) -> ApiResult<Json<Release>> {
    let target = format!("{ns}/{rel}");
    let revoke = match action.as_str() {
        "yank" => false,
        "revoke" => true,
        "certify" => {
            return Ok(Json(
                reg.certify_release(&actor, &target, &req.reason).await?,
            ))
        }
        "request-certification" => {
            return Ok(Json(
                reg.request_certification(&actor, &target, &req.reason)
                    .await?,
            ))
        }
        "retest" => {
            let r = reg.retest_release(&actor, &target).await?;
            let reg = reg.clone();
            tokio::spawn(async move {
                if let Err(e) = reg.smoke_release(&target).await {
                    tracing::warn!("hub: smoke test of {target}: {}", e.message);
                }
            });
            return Ok(Json(r));
        }
        _ => {
            return Err(ApiError::not_found(format!(
                "no action {action}: yank, revoke, retest, request-certification or certify"
            )))
        }
    };
    Ok(Json(
        reg.mark_release(&actor, &target, revoke, &req.reason)
            .await?,
    ))
}

/// Sign a snapshot and timestamp for an offline bundle (`macula hub bundle export`), valid for
/// `days` (the chain's other roles may end it sooner); with `ecosystems`, also the Hub's
/// vulnerability records for them, with its signature.
#[utoipa::path(post, path = "/v1/hub/bundle-metadata", tag = "hub", security(("session" = [])),
    request_body = NewBundleMetadata,
    responses((status = 200, body = BundleMetadata, description = "The bundle's snapshot and timestamp."),
        (status = 401, response = ErrorBody), (status = 422, response = ErrorBody)))]
pub(crate) async fn bundle_metadata(
    State(reg): Reg,
    actor: Actor,
    Body(req): Body<NewBundleMetadata>,
) -> ApiResult<Json<BundleMetadata>> {
    Ok(Json(reg.bundle_metadata(&actor, req).await?))
}

/// The Hub's root of trust (the newest `root.json`) and where its TUF repository is read.
///
/// The repository is served under `/v1/hub/tuf/`: `metadata/timestamp.json`,
/// `metadata/N.snapshot.json`, `metadata/N.targets.json`, `metadata/N.<publisher>.json`,
/// `metadata/N.root.json`, and targets at `targets/<publisher>/<sha256>.<name>@<version>` —
/// the layout python-tuf's `ngclient` reads with consistent snapshots.
#[utoipa::path(get, path = "/v1/hub/trust", tag = "hub",
    responses((status = 200, body = Trust, description = "The root of trust."),
        (status = 404, response = ErrorBody)))]
pub(crate) async fn hub_trust(State(reg): Reg) -> ApiResult<Json<Trust>> {
    Ok(Json(reg.hub_trust().await?))
}

/// A file of the TUF repository (see [`hub_trust`]).
pub(crate) async fn tuf_file(State(reg): Reg, Path(path): Path<String>) -> ApiResult<Response> {
    let hub = reg.hub()?;
    let ok = !path.is_empty()
        && path.len() <= 512
        && (path.starts_with("metadata/") || path.starts_with("targets/"))
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with(".tmp"));
    if !ok {
        return Err(ApiError::not_found(format!("no file {path}")));
    }
    let full = hub.repo_dir().join(&path);
    let bytes = tokio::fs::read(&full)
        .await
        .map_err(|_| ApiError::not_found(format!("no file {path}")))?;
    let kind = if path.ends_with(".json") && path.starts_with("metadata/") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    Ok(([(header::CONTENT_TYPE, kind)], bytes).into_response())
}
