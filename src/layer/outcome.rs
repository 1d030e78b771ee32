//! A decision's outcome: a store's answer turned into an allowed request or a
//! rejection (the failure mode deciding when the store failed), the
//! observer told, and the response of a rejection.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response};

use super::engine::Shared;
use super::rejected::Policies;
use crate::extract::{KeyExtractor, RequestView};
use crate::headers::ceil_secs;
use crate::observe::{Observer, Outcome, Seen, Watch, outcome};
use crate::plan::FailureMode;
use crate::resolver::Answer;
use crate::response::{
    Decision, RETRY_AFTER_MS, Reason, Rejection, Unchecked, X_SHOULD_RETRY, grpc_answer_type,
    refused,
};
use crate::store::{Applied, Denied, Report, Store, StoreError, Verdict};

impl<K, S> Shared<K, S> {
    /// Turns a store's answer into a decision; a failed store lets the
    /// request through (`Open`, without rate-limit headers) or refuses it
    /// with 503 (`Closed`). `waited` tells an answer after a round trip from
    /// one given at once (the memory store, an over-limit cache).
    #[inline]
    pub(crate) fn conclude<R: Unchecked>(
        &self,
        result: Result<Result<R, Denied>, StoreError>,
        failure: FailureMode,
        waited: bool,
    ) -> Decision<R> {
        if waited && result.is_ok() {
            self.failures.answered_under(failure);
        }
        match result {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(d)) => {
                let rejection = Rejection::denied(d.denial, &d.limit, self.quota_status);
                Err(refused(rejection, Some(d.limit)))
            }
            Err(e) => {
                self.failures.failed_under(&e, failure);
                match failure {
                    FailureMode::Open => Ok(R::unchecked()),
                    // A store that decides `Local` failures keeps its own
                    // copy and never gets here; one that keeps none refuses.
                    FailureMode::Closed | FailureMode::Local => {
                        Err(refused(Rejection::unavailable(), None))
                    }
                }
            }
        }
    }
}

impl<K, S> Shared<K, S> {
    /// [`conclude`](Shared::conclude), then the observer, if any, sees the decision.
    #[inline]
    pub(crate) fn conclude_seen<R: Unchecked>(
        &self,
        result: Result<Result<R, Denied>, StoreError>,
        failure: FailureMode,
        waited: bool,
        seen: Seen<'_>,
    ) -> Decision<R> {
        match &self.observer {
            None => self.conclude(result, failure, waited),
            Some(observer) => self.conclude_observed(&**observer, result, failure, waited, seen),
        }
    }

    #[inline(never)]
    fn conclude_observed<R: Unchecked>(
        &self,
        observer: &dyn Observer,
        result: Result<Result<R, Denied>, StoreError>,
        failure: FailureMode,
        waited: bool,
        seen: Seen<'_>,
    ) -> Decision<R> {
        let failed = result.is_err().then_some(failure);
        let decision = self.conclude(result, failure, waited);
        let (outcome, limit) = outcome(&decision, failed);
        observer.on_decision(&seen.event(outcome, limit));
        decision
    }

    /// [`conclude_seen`](Shared::conclude_seen) for a decision the store made
    /// at once, over a shadow limit (which `report` holds): the observer is
    /// told the request went over it.
    #[cold]
    #[inline(never)]
    pub(crate) fn conclude_overrun(
        &self,
        verdict: Result<(), Denied>,
        failure: FailureMode,
        report: &Report,
        seen: Seen<'_>,
    ) -> Decision<()> {
        let verdict = verdict.map(|()| Overrun(report.shadow_denied()));
        self.conclude_seen(Ok(verdict), failure, false, seen)
            .map(|_| ())
    }

    /// What a request that waits for the store keeps for the observer:
    /// nothing without one. Boxed, as it rides in every [`Step`], which is
    /// kept to a few words.
    ///
    /// [`Step`]: super::Step
    #[inline]
    pub(crate) fn watch(&self, seen: Seen<'_>) -> Option<Box<Watch>> {
        self.observer.as_ref()?;
        Watch::new(&seen).map(Box::new)
    }

    /// [`conclude`](Shared::conclude) for an answer the request waited for; the
    /// observer sees it with what the request kept (`watch`) and the request.
    pub(crate) fn conclude_watched(
        &self,
        result: Result<Verdict, StoreError>,
        failure: FailureMode,
        watch: Option<Box<Watch>>,
        req: Option<RequestView<'_>>,
    ) -> Decision {
        let (Some(observer), Some(watch)) = (&self.observer, watch) else {
            return self.conclude(result, failure, true);
        };
        let failed = result.is_err().then_some(failure);
        let decision = self.conclude(result, failure, true);
        let (outcome, limit) = outcome(&decision, failed);
        observer.on_decision(&watch.event(req, outcome, limit));
        decision
    }

    /// The rejection of a key problem (decided before any store is asked),
    /// seen by the observer.
    #[inline]
    pub(crate) fn refuse(&self, reason: Reason, seen: Seen<'_>) -> Rejection {
        self.refuse_if::<true>(reason, seen)
    }

    /// [`refuse`](Self::refuse), the observer told only when `TOLD`: a
    /// peek (see [`PEEK`](super::engine::PEEK)) decides nothing, and
    /// observers are told of no peek, not even of one whose key is refused.
    #[inline]
    pub(crate) fn refuse_if<const TOLD: bool>(&self, reason: Reason, seen: Seen<'_>) -> Rejection {
        let rejection = Rejection::key(reason);
        if let (true, Some(observer)) = (TOLD, &self.observer) {
            observer.on_decision(&seen.event(Outcome::Rejected(reason), None));
        }
        rejection
    }

    /// The observer, if any, sees a decision of the memory store made
    /// directly ([`check`](crate::RateLimitLayer::check)) that let a request
    /// over a shadow limit through.
    pub(crate) fn checked_overrun(&self, over: Denied, seen: Seen<'_>) {
        if let Some(observer) = &self.observer {
            let rejection = Rejection::denied(over.denial, &over.limit, self.quota_status);
            let outcome = Outcome::ShadowRejected(rejection.reason());
            observer.on_decision(&seen.event(outcome, rejection.limit()));
        }
    }

    /// The observer, if any, sees a decision of the memory store made
    /// directly ([`check`](crate::RateLimitLayer::check)).
    #[inline]
    pub(crate) fn checked(&self, result: &Result<(), Denied>, seen: Seen<'_>) {
        if let Some(observer) = &self.observer {
            let event = match result {
                Ok(()) => seen.event(Outcome::Allowed, None),
                Err(d) => {
                    let rejection = Rejection::denied(d.denial, &d.limit, self.quota_status);
                    seen.event(Outcome::Rejected(rejection.reason()), rejection.limit())
                }
            };
            observer.on_decision(&event);
        }
    }
}

/// What a shadow limit would have denied, for the observer of a decision
/// whose report stays where the store wrote it.
struct Overrun(Option<Denied>);

impl Unchecked for Overrun {
    fn unchecked() -> Self {
        Overrun(None)
    }

    fn shadow_denied(&self) -> Option<Denied> {
        self.0
    }
}

impl<K: KeyExtractor, S: Store> Shared<K, S> {
    /// The response for a rejected request: the rejection's response in the
    /// layer's style, `Retry-After`, `retry-after-ms` and `x-should-retry`
    /// unless a custom response set them, and the rate-limit headers: the
    /// limit that denied, with every policy of the request announced as an
    /// allowed response announces them (`answer` is the resolver's answer
    /// the request was decided by, if it was).
    #[cold]
    pub(crate) fn reject(
        &self,
        rejection: Rejection,
        limit: Option<Applied>,
        req: &RequestView<'_>,
        answer: Option<&Answer>,
    ) -> Response<Bytes> {
        let rejection = self.styled(rejection);
        let mut res = match &self.on_rejection {
            Some(f) => f.response(&rejection),
            None => rejection.default_response(),
        };
        let headers = res.headers_mut();
        if rejection.is_grpc()
            && headers
                .get(CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"application/grpc"))
            && let Some(answer) = grpc_answer_type(req.headers)
        {
            headers.insert(CONTENT_TYPE, answer);
        }
        // The wait: until the request passes, or, for a cost that never
        // fits, until the limit is as full as it gets; never 0.
        let wait = rejection
            .wait()
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
        if let Some(wait) = wait {
            headers
                .entry(RETRY_AFTER)
                .or_insert_with(|| HeaderValue::from(ceil_secs(wait)));
            headers
                .entry(RETRY_AFTER_MS)
                .or_insert_with(|| HeaderValue::from(wait.div_ceil(1_000_000)));
        }
        if rejection.says_do_not_retry() {
            headers
                .entry(X_SHOULD_RETRY)
                .or_insert_with(|| HeaderValue::from_static("false"));
        }
        if let Some(limit) = limit {
            let policies = match self.headers.has_ietf() || self.headers.has_openai() {
                true => self.policies(req, answer),
                false => Policies::new(),
            };
            let wait = wait.unwrap_or(limit.reset);
            self.headers.write_denied(&limit, wait, &policies, headers);
        }
        res.extensions_mut().insert(rejection);
        res
    }
}

impl<K, S> Shared<K, S> {
    /// `rejection` answered in the layer's style.
    #[inline]
    pub(crate) fn styled(&self, rejection: Rejection) -> Rejection {
        rejection.with_style(self.style, self.max_retry)
    }
}
