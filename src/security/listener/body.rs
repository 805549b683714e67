//! The service wrapper that tells a connection's [`Phase`](super::phase::Phase) when its
//! request has been read completely and when its response is done.
//!
//! What must hold: a request without a body counts as read once its headers are; one with a
//! body once the body reaches its end (the end of the stream, or its Content-Length), and
//! until then its handler counts as waiting on the client exactly while its last poll of the
//! body found nothing; the
//! response counts as done when hyper drops its body (written, or the connection ended), or
//! when the handler's future is dropped before it answered.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Bytes;
use axum::Router;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::service::TowerToHyperService;

use super::room::Conn;

/// `app` serving one connection, reporting the phases of its requests to `conn`.
pub(super) fn service(
    app: Router,
    conn: Arc<Conn>,
) -> impl Service<Request<Incoming>, Response = Response<Answer>, Error = Infallible, Future: Send> {
    let app = TowerToHyperService::new(app);
    hyper::service::service_fn(move |req: Request<Incoming>| {
        conn.phase.headers_read();
        let answering = Answering(conn.clone());
        if req.body().is_end_stream() {
            conn.phase.request_read();
        }
        let req = req.map(|inner| ReadBody { inner, conn: conn.clone() });
        let handled = app.call(req);
        async move {
            let response = handled.await?;
            Ok(response.map(|inner| Answer { inner, _answering: answering }))
        }
    })
}

/// Reports the response done when dropped.
struct Answering(Arc<Conn>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.phase.response_done();
    }
}

/// A request body that reports when it has been read to its end.
pub(super) struct ReadBody {
    inner: Incoming,
    conn: Arc<Conn>,
}

impl Body for ReadBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Pending => {
                this.conn.phase.awaiting_body(true);
                false
            }
            Poll::Ready(Some(Err(_))) => false,
        };
        if matches!(polled, Poll::Ready(Some(Ok(_)))) {
            this.conn.phase.awaiting_body(false);
        }
        if ended {
            this.conn.phase.request_read();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that reports the response done when hyper drops it.
pub(super) struct Answer {
    inner: axum::body::Body,
    _answering: Answering,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
