//! Ranged reads of shard objects: just the chunks a batch needs, for shards the epoch
//! plan does not cache whole. Every later range of an object is an `If-Match` request
//! on the ETag its first range saw.

use futures::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange};

use super::download::start_get;
use super::prefetch::{Fetcher, Object};
use super::store::Failure;
use super::{RangeRequest, RangeSource};
use crate::error::{Error, RemoteFailure, Result};

impl RangeSource for Fetcher {
    fn get_ranges(&self, reqs: &[RangeRequest]) -> Result<Vec<(Vec<u8>, Option<String>)>> {
        let first = reqs.first().map(|r| r.shard);
        let url = first.and_then(|i| self.objects.get(i as usize)).map(|o| o.url.clone()).unwrap_or_default();
        let stopped = |detail: &str| Error::Remote {
            url: url.clone(),
            shard: first,
            kind: RemoteFailure::Unavailable,
            detail: detail.into(),
        };
        let Some(base) = self.open_plan() else { return Err(stopped("the dataset was closed")) };
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::InvalidArgument(
                "ranged reads of an s3:// shard block: call them outside an async runtime (e.g. spawn_blocking)".into(),
            ));
        }
        let mut irq = self.irq.subscribe();
        // The reader stopped (now, or before this call began).
        let stop = async move {
            let _ = irq.wait_for(|g| *g != base).await;
        };
        let all = futures::stream::iter(reqs.iter().cloned())
            .map(|r| get_range(self, r))
            .buffered(self.concurrency * 8)
            .try_collect::<Vec<_>>();
        self.handle.block_on(async move {
            match futures::future::select(Box::pin(all), Box::pin(stop)).await {
                futures::future::Either::Left((r, _)) => r,
                futures::future::Either::Right(_) => Err(stopped("the reader stopped while waiting for ranged reads")),
            }
        })
    }
}

/// One ranged GET (retried with backoff) of a shard object, within the per-object
/// timeout overall: a server that trickles bytes cannot stretch it.
async fn get_range(inner: &Fetcher, req: RangeRequest) -> Result<(Vec<u8>, Option<String>)> {
    let b = &inner.bucket;
    match tokio::time::timeout(b.timeout, get_range_retried(inner, &req)).await {
        Ok(r) => r,
        Err(_) => {
            let url = inner.objects.get(req.shard as usize).map(|o| o.url.clone()).unwrap_or_default();
            Err(Error::Remote {
                url,
                shard: Some(req.shard),
                kind: RemoteFailure::Unavailable,
                detail: format!("bytes {:?} did not arrive within the timeout ({:?})", req.range, b.timeout),
            })
        }
    }
}

async fn get_range_retried(inner: &Fetcher, req: &RangeRequest) -> Result<(Vec<u8>, Option<String>)> {
    let i = req.shard;
    let range = req.range.clone();
    let o = inner.objects.get(i as usize).ok_or_else(|| Error::InvalidArgument(format!("no shard {i}")))?;
    let b = &inner.bucket;
    if range.start >= range.end || range.end > o.size {
        return Err(Error::InvalidArgument(format!("bytes {range:?} of {} ({} bytes)", o.url, o.size)));
    }
    b.with_retries(&o.url, Some(i), || range_once(inner, o, range.clone(), req.if_match.clone())).await
}

/// One attempt of [`get_range`]: the bytes and the object's ETag.
async fn range_once(
    inner: &Fetcher,
    o: &Object,
    range: std::ops::Range<u64>,
    if_match: Option<String>,
) -> std::result::Result<(Vec<u8>, Option<String>), Failure> {
    let b = &inner.bucket;
    let opts = GetOptions { range: Some(GetRange::Bounded(range.clone())), if_match, ..Default::default() };
    let got = start_get(inner, o, opts).await?;
    if got.range != range {
        return Err(Failure::Transient(format!("asked for bytes {range:?}, got {:?}", got.range)));
    }
    let tag = got.meta.e_tag.clone();
    let want = (range.end - range.start) as usize;
    let mut out = Vec::with_capacity(want);
    let mut s = got.into_stream();
    loop {
        match tokio::time::timeout(b.stall, s.next()).await {
            Err(_) => return Err(Failure::Transient(format!("no data for {:?} after {} bytes", b.stall, out.len()))),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(b.classify(e)),
            Ok(Some(Ok(bytes))) => {
                inner.received.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if out.len() + bytes.len() > want {
                    return Err(Failure::Transient(format!("more than the {want} bytes asked for")));
                }
                out.extend_from_slice(&bytes);
            }
        }
    }
    if out.len() != want {
        return Err(Failure::Transient(format!("body ended after {} of {want} bytes", out.len())));
    }
    Ok((out, tag))
}
