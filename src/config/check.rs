//! Checks the document's plan values and builds them, each error located.
//!
//! A plan table becomes a `UsagePlan`, an account table an `Account`, a
//! throttle table a `Throttle`, a methods table the method overrides; an error names the line, column and
//! path of the offending field. The checks across the document (unique
//! names, keys, known plans) are in `load`.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use toml::Spanned;

use super::document::{
    AccountFile, FailureFile, Int, PeriodFile, PlanFile, QuotaFile, ThrottleFile, TokensFile,
};
use super::error::ConfigFileError;
use super::location::line_col;
use crate::error::ConfigError;
use crate::plan::{
    Account, FailureMode, MethodPath, ModelLimits, Quota, Throttle, TokenBudget, UsagePlan,
};
use crate::window::{Date, Period};

/// Turns semantic errors into located ones.
pub(super) struct Checker<'a> {
    pub(super) src: &'a str,
}

impl Checker<'_> {
    pub(super) fn err(
        &self,
        span: Range<usize>,
        path: impl Into<String>,
        message: impl fmt::Display,
    ) -> ConfigFileError {
        let (line, column) = line_col(self.src, span.start);
        ConfigFileError {
            file: None,
            line,
            column,
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub(super) fn throttle(
        &self,
        t: &Spanned<ThrottleFile>,
        path: &str,
    ) -> Result<Throttle, ConfigFileError> {
        let v = t.get_ref();
        let burst = u32::try_from(v.burst.get_ref().0).map_err(|_| {
            self.err(
                v.burst.span(),
                format!("{path}.burst"),
                "burst must be between 1 and 4294967295",
            )
        })?;
        Throttle::new(*v.rate.get_ref(), burst).map_err(|e| {
            let (span, field) = match e {
                ConfigError::ZeroBurst => (v.burst.span(), "burst"),
                _ => (v.rate.span(), "rate"),
            };
            self.err(span, format!("{path}.{field}"), e)
        })
    }

    fn positive(&self, n: &Spanned<Int>, path: String) -> Result<u64, ConfigFileError> {
        u64::try_from(n.get_ref().0)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| self.err(n.span(), path, "must be a whole number above zero"))
    }

    pub(super) fn methods(
        &self,
        methods: &BTreeMap<Spanned<String>, Spanned<ThrottleFile>>,
        path: &str,
    ) -> Result<Vec<(String, Throttle)>, ConfigFileError> {
        let mut seen: Vec<(MethodPath, &str)> = Vec::with_capacity(methods.len());
        methods
            .iter()
            .map(|(k, v)| {
                let p = format!("{path}.methods.\"{}\"", k.get_ref());
                let parsed =
                    MethodPath::parse(k.get_ref()).map_err(|e| self.err(k.span(), p.clone(), e))?;
                // `/v1/x/POST` and `/v1/x/post` are one override.
                if let Some((_, first)) = seen.iter().find(|(m, _)| *m == parsed) {
                    let why = format!("the same method path as \"{first}\": listed twice");
                    return Err(self.err(k.span(), p, why));
                }
                seen.push((parsed, k.get_ref()));
                Ok((k.get_ref().clone(), self.throttle(v, &p)?))
            })
            .collect()
    }

    pub(super) fn plan(
        &self,
        i: usize,
        p: &Spanned<PlanFile>,
    ) -> Result<UsagePlan, ConfigFileError> {
        let path = format!("plans[{i}]");
        let f = p.get_ref();
        let name = f.name.get_ref();
        if name.trim().is_empty() {
            return Err(self.err(f.name.span(), format!("{path}.name"), "must not be empty"));
        }
        let mut plan = UsagePlan::new(name.clone())
            .failure(match f.failure {
                FailureFile::Local => FailureMode::Local,
                FailureFile::Open => FailureMode::Open,
                FailureFile::Closed => FailureMode::Closed,
            })
            .borrow(f.borrow)
            .shadow(f.shadow);
        if let Some(t) = &f.throttle {
            plan = plan.throttle(self.throttle(t, &format!("{path}.throttle"))?);
        }
        if let Some(q) = &f.quota {
            plan = plan.quota(self.quota(q, &format!("{path}.quota"))?);
        }
        if let Some(t) = &f.tokens {
            plan = plan.tokens(self.tokens(t, &path)?);
        }
        if let Some(c) = &f.concurrency {
            plan = plan.concurrency(self.cap(c, &path)?);
        }
        for (mp, t) in self.methods(&f.methods, &path)? {
            plan = plan.method(mp, t);
        }
        // A backend serves `Big-Model` and `big-model:latest` as
        // `big-model`, and the plan's limits are found alike: two entries
        // for one model are an error, named at the later one in the file.
        let mut names: Vec<&Spanned<String>> = f.models.keys().collect();
        names.sort_by_key(|n| n.span().start);
        for (i, second) in names.iter().enumerate() {
            if let Some(first) = names[..i]
                .iter()
                .find(|first| crate::plan::model::same_model(first.get_ref(), second.get_ref()))
            {
                let why = format!(
                    "the same model as \"{}\" (names are compared without regard to ASCII case, `:latest` and `library/`): listed twice",
                    first.get_ref()
                );
                let mp = format!("{path}.models.\"{}\"", second.get_ref());
                return Err(self.err(second.span(), mp, why));
            }
        }
        for (name, m) in &f.models {
            let mp = format!("{path}.models.\"{}\"", name.get_ref());
            if name.get_ref().is_empty() {
                return Err(self.err(name.span(), mp, "a model's name must not be empty"));
            }
            let m = m.get_ref();
            // A named model without limits of its own is not under `"*"`
            // (and the gateway lists it); a `"*"` without any limits nothing.
            if name.get_ref() == "*"
                && m.throttle.is_none()
                && m.quota.is_none()
                && m.tokens.is_none()
                && m.concurrency.is_none()
            {
                return Err(self.err(
                    name.span(),
                    mp,
                    "sets no limit: give it a throttle, quota, tokens or concurrency, or leave it out",
                ));
            }
            let mut limits = ModelLimits::new();
            if let Some(t) = &m.throttle {
                limits = limits.throttle(self.throttle(t, &format!("{mp}.throttle"))?);
            }
            if let Some(q) = &m.quota {
                limits = limits.quota(self.quota(q, &format!("{mp}.quota"))?);
            }
            if let Some(t) = &m.tokens {
                limits = limits.tokens(self.tokens(t, &mp)?);
            }
            if let Some(c) = &m.concurrency {
                limits = limits.concurrency(self.cap(c, &mp)?);
            }
            plan = plan.model(name.get_ref().clone(), limits);
        }
        Ok(plan)
    }

    /// A whole number above zero that fits a `u32`; one above it names the
    /// bound.
    fn positive_u32(&self, n: &Spanned<Int>, path: String) -> Result<u32, ConfigFileError> {
        let m = self.positive(n, path.clone())?;
        u32::try_from(m).map_err(|_| {
            self.err(
                n.span(),
                path,
                format!("must be a whole number from 1 to {}", u32::MAX),
            )
        })
    }

    /// The concurrency cap of the plan or model at `path`.
    fn cap(&self, c: &Spanned<Int>, path: &str) -> Result<u32, ConfigFileError> {
        self.positive_u32(c, format!("{path}.concurrency"))
    }

    /// A quota at `qp` (`plans[0].quota`).
    fn quota(&self, q: &Spanned<QuotaFile>, qp: &str) -> Result<Quota, ConfigFileError> {
        let qf = q.get_ref();
        let period = match (qf.period, qf.week_start) {
            (PeriodFile::Day, None) => Period::Day,
            (PeriodFile::Month, None) => Period::Month,
            (PeriodFile::Week, day) => Period::Week(day.unwrap_or_default()),
            (_, Some(_)) => {
                return Err(self.err(
                    q.span(),
                    format!("{qp}.week_start"),
                    "only a WEEK quota has a start day",
                ));
            }
        };
        let limit = self.positive(&qf.limit, format!("{qp}.limit"))?;
        let mut quota = Quota::new(limit, period)
            .map_err(|e| self.err(qf.limit.span(), format!("{qp}.limit"), e))?;
        if let Some(offset) = &qf.offset {
            let o = u64::try_from(offset.get_ref().0).map_err(|_| {
                self.err(
                    offset.span(),
                    format!("{qp}.offset"),
                    "must not be negative",
                )
            })?;
            quota = quota
                .with_offset(o)
                .map_err(|e| self.err(offset.span(), format!("{qp}.offset"), e))?;
        }
        if let Some(created) = &qf.created {
            let date = match created.get_ref() {
                toml::value::Datetime {
                    date: Some(d),
                    time: None,
                    offset: None,
                } => Date::new(i32::from(d.year), d.month, d.day),
                _ => None,
            }
            .ok_or_else(|| {
                self.err(
                    created.span(),
                    format!("{qp}.created"),
                    "must be a date, such as 2026-12-06 (the UTC day the plan was created)",
                )
            })?;
            quota = quota.created_on(date);
        }
        Ok(quota)
    }

    /// The token budget of the plan or account at `path` (`plans[0]`).
    fn tokens(&self, t: &Spanned<TokensFile>, path: &str) -> Result<TokenBudget, ConfigFileError> {
        let tf = t.get_ref();
        if tf.per_minute.is_none() && tf.per_day.is_none() && tf.per_month.is_none() {
            return Err(self.err(
                t.span(),
                format!("{path}.tokens"),
                "sets no limit: give it per_minute, per_day or per_month, or leave it out",
            ));
        }
        let mut budget = TokenBudget::new();
        if let Some(v) = &tf.per_minute {
            let field = format!("{path}.tokens.per_minute");
            let n = self.positive_u32(v, field.clone())?;
            budget = budget
                .per_minute(n)
                .map_err(|e| self.err(v.span(), field, e))?;
        }
        for (name, v, set) in [
            (
                "per_day",
                &tf.per_day,
                TokenBudget::per_day as fn(TokenBudget, u64) -> _,
            ),
            ("per_month", &tf.per_month, TokenBudget::per_month),
        ] {
            if let Some(v) = v {
                let field = format!("{path}.tokens.{name}");
                let n = self.positive(v, field.clone())?;
                budget = set(budget, n).map_err(|e| self.err(v.span(), field, e))?;
            }
        }
        Ok(budget)
    }

    /// The account of `[[accounts]]` number `i`.
    pub(super) fn account(
        &self,
        i: usize,
        a: &Spanned<AccountFile>,
    ) -> Result<Account, ConfigFileError> {
        let path = format!("accounts[{i}]");
        let f = a.get_ref();
        let name = f.name.get_ref();
        if name.trim().is_empty() {
            return Err(self.err(f.name.span(), format!("{path}.name"), "must not be empty"));
        }
        let mut account = Account::new(name.clone());
        if let Some(t) = &f.throttle {
            account = account.throttle(self.throttle(t, &format!("{path}.throttle"))?);
        }
        if let Some(q) = &f.quota {
            account = account.quota(self.quota(q, &format!("{path}.quota"))?);
        }
        if let Some(t) = &f.tokens {
            account = account.tokens(self.tokens(t, &path)?);
        }
        Ok(account)
    }
}
