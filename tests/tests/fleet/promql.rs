//! The metric and label names a PromQL expression refers to, read from its syntax tree as
//! `promql-parser` (a maintained PromQL parser) builds it.
use std::collections::BTreeSet;

use promql_parser::{
    parser::{self, Expr, VectorSelector},
    util::{ExprVisitor, walk_expr},
};

/// The metric names and label names of one expression.
#[derive(Debug, Default, PartialEq)]
pub struct Refs {
    pub metrics: BTreeSet<String>,
    pub labels: BTreeSet<String>,
}

/// The names `expr` refers to: metric names of its selectors (a `__name__` matcher's value
/// too), the labels its matchers name, and those of `by`/`without`, `on`/`ignoring` and
/// `group_left`/`group_right`. Panics when `expr` is not PromQL.
pub fn refs(expr: &str) -> Refs {
    let ast = parser::parse(expr).unwrap_or_else(|e| panic!("not PromQL: {e}: {expr}"));
    let mut refs = Refs::default();
    let Ok(_) = walk_expr(&mut refs, &ast);
    refs
}

impl Refs {
    fn selector(&mut self, vs: &VectorSelector) {
        self.metrics.extend(vs.name.iter().cloned());
        let matchers = &vs.matchers;
        for m in matchers.matchers.iter().chain(matchers.or_matchers.iter().flatten()) {
            if m.name == "__name__" {
                self.metrics.insert(m.value.clone());
            } else {
                self.labels.insert(m.name.clone());
            }
        }
    }
}

impl ExprVisitor for Refs {
    type Error = std::convert::Infallible;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
        match expr {
            Expr::VectorSelector(vs) => self.selector(vs),
            Expr::MatrixSelector(ms) => self.selector(&ms.vs),
            Expr::Aggregate(a) => {
                if let Some(m) = &a.modifier {
                    self.labels.extend(m.labels().labels.iter().cloned());
                }
            }
            Expr::Binary(b) => {
                if let Some(m) = &b.modifier {
                    if let Some(on) = &m.matching {
                        self.labels.extend(on.labels().labels.iter().cloned());
                    }
                    if let Some(group) = m.card.labels() {
                        self.labels.extend(group.labels.iter().cloned());
                    }
                }
            }
            _ => {}
        }
        Ok(true)
    }
}
