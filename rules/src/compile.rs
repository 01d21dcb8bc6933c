//! Name resolution, type checking and compilation of a parsed rule file into
//! [`CompiledRules`]: definitions in evaluation order, the distinct aggregates they share,
//! and which definitions each event type and profile attribute can change.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::ast::{self, AggFunc, BinaryOp, DefBody, Expr, ExprKind, Literal, UnaryOp, Window};
use crate::diagnostic::{did_you_mean, Code, Diagnostic, Span};
use crate::value::{Type, Value};

/// Index of a definition in [`CompiledRules::defs`] (source order).
pub type DefId = usize;
/// Index of an aggregate in [`CompiledRules::aggregates`].
pub type AggId = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefKind {
    Trait,
    ConditionTag,
    EventTag,
    Segment,
}

impl DefKind {
    /// Tags and segments have members and emit changes; traits are values.
    pub fn has_members(self) -> bool {
        !matches!(self, DefKind::Trait)
    }

    pub fn is_tag(self) -> bool {
        matches!(self, DefKind::ConditionTag | DefKind::EventTag)
    }
}

/// A compiled expression: names resolved to ids, constants folded.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Const(Value),
    List(Vec<Node>),
    Profile(Arc<str>),
    Has(Arc<str>),
    /// An event property (only inside `where`).
    Prop(Arc<str>),
    Agg(AggId),
    Def(DefId),
    Not(Box<Node>),
    Neg(Box<Node>),
    Binary(BinaryOp, Box<Node>, Box<Node>),
}

/// One distinct aggregate over a customer's events, shared by every definition using it.
#[derive(Debug, Clone, PartialEq)]
pub struct AggSpec {
    pub func: AggFunc,
    pub event_type: Arc<str>,
    /// Dotted property path for `sum avg min max distinct last first`.
    pub property: Option<Arc<str>>,
    /// The `where` predicate over the event's properties (and the profile).
    pub filter: Option<Node>,
    /// `Some` for windowed aggregates; `None` for `last`, `first` and `since`.
    pub window: Option<Window>,
    /// Profile attributes the filter reads: a change to one re-evaluates this aggregate.
    pub profile_reads: Vec<Arc<str>>,
    /// Canonical text, e.g. `sum(payment.amount, 30d)`.
    pub text: String,
    /// The [`AggSource`] this aggregate reads its events from, and its place among that
    /// source's `aggregates`.
    pub source: usize,
    pub position: usize,
    /// Where its input (the property it reads) sits in that source's `properties`.
    pub slot: Option<usize>,
}

/// The events some aggregates read: one event type with one `where`. Aggregates that differ
/// only in function, property or window (`sum(payment.amount, 30d)`, `count(payment,
/// lifetime)`) share a source, so the engine keeps one queue of these events per customer
/// for all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct AggSource {
    pub event_type: Arc<str>,
    pub filter: Option<Node>,
    /// Profile attributes the filter reads.
    pub profile_reads: Vec<Arc<str>>,
    /// The properties its aggregates read: one input column each.
    pub properties: Vec<Arc<str>>,
    /// The aggregates over it.
    pub aggregates: Vec<AggId>,
}

/// An event tag: `tag NAME on TYPE [where PRED] [ttl D]`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventTagSpec {
    pub event_type: Arc<str>,
    pub filter: Option<Node>,
    pub ttl_ms: Option<i64>,
    /// Profile attributes the filter reads: when one changes, past events are judged again.
    pub profile_reads: Vec<Arc<str>>,
}

#[derive(Debug, Clone)]
pub struct CompiledDef {
    pub id: DefId,
    pub name: Arc<str>,
    pub kind: DefKind,
    /// The value expression; `None` for event tags.
    pub expr: Option<Node>,
    pub event_tag: Option<EventTagSpec>,
    pub ty: Type,
    /// Definitions this one reads directly.
    pub deps: Vec<DefId>,
    /// Event types whose events can change this definition (transitively).
    pub event_types: BTreeSet<Arc<str>>,
    /// Profile attributes whose change can change this definition (transitively).
    pub profile_attrs: BTreeSet<Arc<str>>,
    /// True when the value can change by time alone (windows, ttl, `since`), transitively.
    pub time_dependent: bool,
    /// True when the value depends on `now` continuously through `since` (transitively).
    pub uses_since: bool,
    /// The definition as written, for `GET /v1/rules` style listings and explain.
    pub source: String,
    pub span: Span,
}

/// A rule set compiled once and evaluated many times.
#[derive(Debug, Clone)]
pub struct CompiledRules {
    pub(crate) source: String,
    pub(crate) defs: Vec<CompiledDef>,
    pub(crate) by_name: HashMap<Arc<str>, DefId>,
    pub(crate) aggregates: Vec<AggSpec>,
    pub(crate) sources: Vec<AggSource>,
    pub(crate) sources_by_event_type: HashMap<Arc<str>, Vec<usize>>,
    pub(crate) order: Vec<DefId>,
    pub(crate) by_event_type: HashMap<Arc<str>, Vec<DefId>>,
    pub(crate) aggs_by_event_type: HashMap<Arc<str>, Vec<AggId>>,
    pub(crate) by_profile_attr: HashMap<Arc<str>, Vec<DefId>>,
    pub(crate) event_tags_by_type: HashMap<Arc<str>, Vec<DefId>>,
    pub(crate) time_dependent: Vec<DefId>,
    /// Comparisons whose operands depend on `now`, per definition: where `since` crosses
    /// a threshold.
    pub(crate) time_comparisons: Vec<(DefId, BinaryOp, Node, Node)>,
    /// The definitions and aggregates that tags and segments read, transitively: what a
    /// change of membership can come from. (Traits no tag or segment reads change with
    /// time too, but they are computed when read and have no changes to emit.)
    pub(crate) membership_reads: (Vec<bool>, Vec<bool>),
    /// Per aggregate, the comparisons with numbers through which alone tags and segments
    /// read it (see [`crate::timing::membership_thresholds`]).
    pub(crate) thresholds: Vec<Option<Vec<crate::timing::Threshold>>>,
    /// Weighted sums of counts that tags and segments compare with numbers (see
    /// [`crate::timing::membership_thresholds`]); their counts are marked read that way.
    pub(crate) combinations: Vec<crate::timing::Combination>,
    /// A fingerprint of what per-customer window state is shaped by (the sources, their
    /// filters and input columns, each aggregate's function, window and input): state kept
    /// under one rule set is reused under another only when the fingerprints agree.
    pub(crate) window_layout: u64,
}

impl CompiledRules {
    /// Parses, checks and compiles a rule file. On failure returns every diagnostic.
    pub fn compile(source: &str) -> Result<CompiledRules, Vec<Diagnostic>> {
        let (file, mut diags) = crate::parser::parse(source);
        let compiled = Compiler::new(source, &file).run(&mut diags);
        if diags.is_empty() {
            Ok(compiled)
        } else {
            diags.sort_by_key(|d| (d.span.start, d.code.as_str()));
            diags.dedup();
            Err(diags)
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every definition, in source order (index = [`DefId`]).
    pub fn defs(&self) -> &[CompiledDef] {
        &self.defs
    }

    pub fn def(&self, id: DefId) -> &CompiledDef {
        &self.defs[id]
    }

    pub fn lookup(&self, name: &str) -> Option<DefId> {
        self.by_name.get(name).copied()
    }

    /// Every distinct aggregate the rule set needs.
    pub fn aggregates(&self) -> &[AggSpec] {
        &self.aggregates
    }

    /// See the field: equal fingerprints mean window state built under one rule set is valid
    /// under the other.
    pub fn window_layout(&self) -> u64 {
        self.window_layout
    }

    /// The distinct event sources of the aggregates; each aggregate's `source` indexes this.
    pub fn aggregate_sources(&self) -> &[AggSource] {
        &self.sources
    }

    /// Aggregate sources over events of `event_type`.
    pub fn sources_for_event_type(&self, event_type: &str) -> &[usize] {
        self.sources_by_event_type
            .get(event_type)
            .map_or(&[], Vec::as_slice)
    }

    /// Definitions in evaluation order: each comes after the definitions it reads.
    pub fn evaluation_order(&self) -> &[DefId] {
        &self.order
    }

    /// Definitions (in evaluation order) that an event of `event_type` can change.
    pub fn affected_by_event_type(&self, event_type: &str) -> &[DefId] {
        self.by_event_type.get(event_type).map_or(&[], Vec::as_slice)
    }

    /// Aggregates over events of `event_type`.
    pub fn aggregates_for_event_type(&self, event_type: &str) -> &[AggId] {
        self.aggs_by_event_type.get(event_type).map_or(&[], Vec::as_slice)
    }

    /// Definitions (in evaluation order) that a change of profile attribute `attr` can change.
    pub fn affected_by_profile_attr(&self, attr: &str) -> &[DefId] {
        self.by_profile_attr.get(attr).map_or(&[], Vec::as_slice)
    }

    /// Event tags set by events of `event_type`.
    pub fn event_tags_for_type(&self, event_type: &str) -> &[DefId] {
        self.event_tags_by_type.get(event_type).map_or(&[], Vec::as_slice)
    }

    /// Definitions whose value can change by time alone, in evaluation order.
    pub fn time_dependent(&self) -> &[DefId] {
        &self.time_dependent
    }

    /// Every event type some definition reads.
    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.by_event_type.keys().map(|k| &**k)
    }
}

/// Groups aggregates by the events they read (type and `where`) and fills in each one's
/// `source` and input `slot`.
fn group_sources(aggregates: &mut [AggSpec]) -> Vec<AggSource> {
    let mut sources: Vec<AggSource> = Vec::new();
    for (id, agg) in aggregates.iter_mut().enumerate() {
        let found = sources
            .iter()
            .position(|s| s.event_type == agg.event_type && s.filter == agg.filter);
        let source = found.unwrap_or_else(|| {
            sources.push(AggSource {
                event_type: agg.event_type.clone(),
                filter: agg.filter.clone(),
                profile_reads: agg.profile_reads.clone(),
                properties: Vec::new(),
                aggregates: Vec::new(),
            });
            sources.len() - 1
        });
        let s = &mut sources[source];
        agg.source = source;
        agg.position = s.aggregates.len();
        s.aggregates.push(id);
        agg.slot = agg.property.as_ref().map(|p| {
            s.properties.iter().position(|q| q == p).unwrap_or_else(|| {
                s.properties.push(p.clone());
                s.properties.len() - 1
            })
        });
    }
    sources
}

struct Compiler<'a> {
    source: &'a str,
    file: &'a ast::RuleFile,
    names: HashMap<&'a str, usize>,
    aggregates: Vec<AggSpec>,
    agg_index: HashMap<String, AggId>,
    defs: Vec<Option<CompiledDef>>,
}

/// What the checker knows of a compiled expression.
#[derive(Clone, Copy)]
struct Typed {
    ty: Type,
    /// Depends on `now` continuously (through `since`).
    now_dependent: bool,
}

struct DefContext<'c> {
    deps: BTreeSet<DefId>,
    event_types: BTreeSet<Arc<str>>,
    profile_attrs: BTreeSet<Arc<str>>,
    aggs: BTreeSet<AggId>,
    time_dependent: bool,
    time_comparisons: Vec<(BinaryOp, Node, Node)>,
    diags: &'c mut Vec<Diagnostic>,
}

impl<'a> Compiler<'a> {
    fn new(source: &'a str, file: &'a ast::RuleFile) -> Self {
        Compiler {
            source,
            file,
            names: HashMap::new(),
            aggregates: Vec::new(),
            agg_index: HashMap::new(),
            defs: Vec::new(),
        }
    }

    fn run(mut self, diags: &mut Vec<Diagnostic>) -> CompiledRules {
        let defs = &self.file.defs;
        for (i, def) in defs.iter().enumerate() {
            if let Some(&first) = self.names.get(def.name.name.as_str()) {
                let line = crate::diagnostic::Position::of(self.source, defs[first].span.start).line;
                diags.push(
                    Diagnostic::new(
                        Code::E0201,
                        def.name.span,
                        format!("`{}` is defined twice", def.name.name),
                    )
                    .with_hint(format!(
                        "the first definition is on line {line}; rename or remove one"
                    )),
                );
            } else {
                self.names.insert(&def.name.name, i);
            }
        }
        let direct_deps: Vec<Vec<usize>> = defs.iter().map(|d| self.name_refs(d)).collect();
        let (order, cyclic) = self.topological_order(&direct_deps, diags);
        self.defs = vec![None; defs.len()];
        let mut time_comparisons = Vec::new();
        for &i in &order {
            let (def, comparisons) = self.compile_def(i, diags);
            time_comparisons.extend(comparisons.into_iter().map(|(op, l, r)| (i, op, l, r)));
            self.defs[i] = Some(def);
        }
        for &i in &cyclic {
            let def = &defs[i];
            self.defs[i] = Some(self.placeholder(i, def));
        }
        let defs: Vec<CompiledDef> = self
            .defs
            .into_iter()
            .map(|d| d.expect("every definition compiled"))
            .collect();
        let mut by_name = HashMap::new();
        for def in &defs {
            by_name.entry(def.name.clone()).or_insert(def.id);
        }
        let mut by_event_type: HashMap<Arc<str>, Vec<DefId>> = HashMap::new();
        let mut by_profile_attr: HashMap<Arc<str>, Vec<DefId>> = HashMap::new();
        let mut event_tags_by_type: HashMap<Arc<str>, Vec<DefId>> = HashMap::new();
        let mut time_dependent = Vec::new();
        for &i in &order {
            let def = &defs[i];
            for t in &def.event_types {
                by_event_type.entry(t.clone()).or_default().push(i);
            }
            for a in &def.profile_attrs {
                by_profile_attr.entry(a.clone()).or_default().push(i);
            }
            if let Some(spec) = &def.event_tag {
                event_tags_by_type
                    .entry(spec.event_type.clone())
                    .or_default()
                    .push(i);
            }
            if def.time_dependent {
                time_dependent.push(i);
            }
        }
        let mut aggs_by_event_type: HashMap<Arc<str>, Vec<AggId>> = HashMap::new();
        for (id, agg) in self.aggregates.iter().enumerate() {
            aggs_by_event_type
                .entry(agg.event_type.clone())
                .or_default()
                .push(id);
        }
        let mut aggregates = self.aggregates;
        let sources = group_sources(&mut aggregates);
        let mut sources_by_event_type: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        for (id, source) in sources.iter().enumerate() {
            sources_by_event_type
                .entry(source.event_type.clone())
                .or_default()
                .push(id);
        }
        let mut rules = CompiledRules {
            source: self.source.to_owned(),
            defs,
            by_name,
            aggregates,
            sources,
            sources_by_event_type,
            order,
            by_event_type,
            aggs_by_event_type,
            by_profile_attr,
            event_tags_by_type,
            time_dependent,
            time_comparisons,
            membership_reads: (Vec::new(), Vec::new()),
            thresholds: Vec::new(),
            combinations: Vec::new(),
            window_layout: 0,
        };
        rules.window_layout = window_layout(&rules.sources, &rules.aggregates);
        let members = rules
            .defs
            .iter()
            .filter(|d| d.kind != DefKind::Trait)
            .map(|d| d.id);
        rules.membership_reads = rules.reads(members);
        (rules.thresholds, rules.combinations) = crate::timing::membership_thresholds(&rules);
        rules
    }

    /// Definitions a definition names (outside `where`), by index.
    fn name_refs(&self, def: &ast::Def) -> Vec<usize> {
        fn walk(e: &Expr, names: &HashMap<&str, usize>, out: &mut Vec<usize>) {
            match &e.kind {
                ExprKind::Name(parts) if parts.len() == 1 => {
                    if let Some(&i) = names.get(parts[0].name.as_str()) {
                        out.push(i);
                    }
                }
                ExprKind::List(items) => items.iter().for_each(|i| walk(i, names, out)),
                ExprKind::Unary(_, inner) => walk(inner, names, out),
                ExprKind::Binary(_, l, r) => {
                    walk(l, names, out);
                    walk(r, names, out);
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        match &def.body {
            DefBody::Trait(e) | DefBody::Segment(e) | DefBody::ConditionTag { expr: e, .. } => {
                walk(e, &self.names, &mut out)
            }
            DefBody::EventTag { .. } => {}
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Orders definitions so each follows its dependencies; reports every cycle with its
    /// full path. Returns the order and the definitions caught in cycles.
    fn topological_order(
        &self,
        deps: &[Vec<usize>],
        diags: &mut Vec<Diagnostic>,
    ) -> (Vec<usize>, Vec<usize>) {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Active,
            Done,
        }
        let defs = &self.file.defs;
        let mut marks = vec![Mark::New; defs.len()];
        let mut order = Vec::new();
        let mut stack: Vec<usize> = Vec::new();

        fn visit(
            i: usize,
            deps: &[Vec<usize>],
            marks: &mut [Mark],
            stack: &mut Vec<usize>,
            order: &mut Vec<usize>,
            cycles: &mut Vec<Vec<usize>>,
        ) {
            match marks[i] {
                Mark::Done => return,
                Mark::Active => {
                    let start = stack.iter().position(|&s| s == i).expect("active node on stack");
                    cycles.push(stack[start..].to_vec());
                    return;
                }
                Mark::New => {}
            }
            marks[i] = Mark::Active;
            stack.push(i);
            for &d in &deps[i] {
                visit(d, deps, marks, stack, order, cycles);
            }
            stack.pop();
            marks[i] = Mark::Done;
            order.push(i);
        }

        let mut cycles = Vec::new();
        for i in 0..defs.len() {
            visit(i, deps, &mut marks, &mut stack, &mut order, &mut cycles);
        }
        let mut in_cycle = vec![false; defs.len()];
        for cycle in &cycles {
            let path: Vec<&str> = cycle
                .iter()
                .chain(std::iter::once(&cycle[0]))
                .map(|&i| defs[i].name.name.as_str())
                .collect();
            let first = cycle[0];
            diags.push(
                Diagnostic::new(
                    Code::E0203,
                    defs[first].name.span,
                    format!("dependency cycle: {}", path.join(" → ")),
                )
                .with_hint(
                    "a definition cannot depend on itself, directly or through others; break the cycle",
                ),
            );
            for &i in cycle {
                in_cycle[i] = true;
            }
        }
        // Anything depending on a cyclic definition cannot be typed either; keep the order
        // but compile those against `any`.
        let cyclic: Vec<usize> = (0..defs.len()).filter(|&i| in_cycle[i]).collect();
        let order = order.into_iter().filter(|&i| !in_cycle[i]).collect();
        (order, cyclic)
    }

    fn placeholder(&self, i: usize, def: &ast::Def) -> CompiledDef {
        CompiledDef {
            id: i,
            name: Arc::from(def.name.name.as_str()),
            kind: def_kind(&def.body),
            expr: Some(Node::Const(Value::Null)),
            event_tag: None,
            ty: Type::Any,
            deps: Vec::new(),
            event_types: BTreeSet::new(),
            profile_attrs: BTreeSet::new(),
            time_dependent: false,
            uses_since: false,
            source: self.source[def.span.start..def.span.end].to_owned(),
            span: def.span,
        }
    }

    fn compile_def(
        &mut self,
        i: usize,
        diags: &mut Vec<Diagnostic>,
    ) -> (CompiledDef, Vec<(BinaryOp, Node, Node)>) {
        let def = &self.file.defs[i];
        let mut cx = DefContext {
            deps: BTreeSet::new(),
            event_types: BTreeSet::new(),
            profile_attrs: BTreeSet::new(),
            aggs: BTreeSet::new(),
            time_dependent: false,
            time_comparisons: Vec::new(),
            diags,
        };
        let kind = def_kind(&def.body);
        let mut event_tag = None;
        let mut expr_node = None;
        let mut ty = Type::Bool;
        let mut uses_since = false;
        match &def.body {
            DefBody::Trait(e) | DefBody::Segment(e) | DefBody::ConditionTag { expr: e, .. } => {
                let (node, typed) = self.expr(e, &mut cx);
                uses_since = typed.now_dependent;
                if kind == DefKind::Trait {
                    ty = typed.ty;
                } else if !matches!(typed.ty, Type::Bool | Type::Any) {
                    let what = if kind == DefKind::Segment {
                        "segment"
                    } else {
                        "tag"
                    };
                    cx.diags.push(
                        Diagnostic::new(
                            Code::E0303,
                            e.span,
                            format!("the condition of {what} `{}` is a {}, not a bool", def.name.name, typed.ty),
                        )
                        .with_hint(format!("a {what} holds only while its condition is `true`; compare the value, like `... >= 1`")),
                    );
                }
                if let DefBody::ConditionTag {
                    ttl: Some((_, span)), ..
                } = &def.body
                {
                    cx.diags.push(
                        Diagnostic::new(Code::E0204, *span, format!("`ttl` on condition tag `{}`", def.name.name))
                            .with_hint(format!(
                                "a condition tag holds exactly while its condition is true; for a tag set by an event and held for a while, write `tag {} on EVENT_TYPE ttl ...`",
                                def.name.name
                            )),
                    );
                }
                expr_node = Some(node);
            }
            DefBody::EventTag {
                event_type,
                filter,
                ttl,
            } => {
                let filter = filter.as_ref().map(|f| self.filter(f, &mut cx).0);
                if let Some((ms, span)) = ttl {
                    if *ms <= 0 {
                        cx.diags.push(Diagnostic::new(
                            Code::E0305,
                            *span,
                            "a ttl must be longer than zero",
                        ));
                    }
                    cx.time_dependent = true;
                }
                let event_type: Arc<str> = Arc::from(event_type.name.as_str());
                cx.event_types.insert(event_type.clone());
                let profile_reads = cx.profile_attrs.iter().cloned().collect();
                event_tag = Some(EventTagSpec {
                    event_type,
                    filter,
                    ttl_ms: ttl.map(|(ms, _)| ms),
                    profile_reads,
                });
            }
        }
        let mut event_types = cx.event_types;
        let mut profile_attrs = cx.profile_attrs;
        let mut time_dependent = cx.time_dependent;
        for &d in &cx.deps {
            if let Some(dep) = &self.defs[d] {
                event_types.extend(dep.event_types.iter().cloned());
                profile_attrs.extend(dep.profile_attrs.iter().cloned());
                time_dependent |= dep.time_dependent;
            }
        }
        let compiled = CompiledDef {
            id: i,
            name: Arc::from(def.name.name.as_str()),
            kind,
            expr: expr_node,
            event_tag,
            ty,
            deps: cx.deps.into_iter().collect(),
            event_types,
            profile_attrs,
            time_dependent,
            uses_since,
            source: self.source[def.span.start..def.span.end].to_owned(),
            span: def.span,
        };
        (compiled, cx.time_comparisons)
    }

    fn lit(l: &Literal) -> (Value, Type) {
        match l {
            Literal::Num(n) => (Value::Num(*n), Type::Num),
            Literal::Str(s) => (Value::str(s), Type::Str),
            Literal::Bool(b) => (Value::Bool(*b), Type::Bool),
            Literal::Null => (Value::Null, Type::Null),
            Literal::Dur(ms) => (Value::Dur(*ms), Type::Dur),
        }
    }

    /// Compiles a value expression (outside `where`).
    fn expr(&mut self, e: &Expr, cx: &mut DefContext) -> (Node, Typed) {
        self.node(e, cx, false)
    }

    /// Compiles a `where` predicate: bare names are event properties.
    fn filter(&mut self, e: &Expr, cx: &mut DefContext) -> (Node, Typed) {
        self.node(e, cx, true)
    }

    fn node(&mut self, e: &Expr, cx: &mut DefContext, in_where: bool) -> (Node, Typed) {
        let plain = |ty| Typed {
            ty,
            now_dependent: false,
        };
        match &e.kind {
            ExprKind::Lit(l) => {
                let (v, ty) = Self::lit(l);
                (Node::Const(v), plain(ty))
            }
            ExprKind::List(items) => {
                let nodes: Vec<Node> = items.iter().map(|i| self.node(i, cx, in_where).0).collect();
                if nodes.iter().all(|n| matches!(n, Node::Const(_))) {
                    let values: Vec<Value> = nodes
                        .into_iter()
                        .map(|n| match n {
                            Node::Const(v) => v,
                            _ => unreachable!("checked all constant"),
                        })
                        .collect();
                    (Node::Const(Value::List(values.into())), plain(Type::List))
                } else {
                    (Node::List(nodes), plain(Type::List))
                }
            }
            ExprKind::Profile(attr) => {
                let name: Arc<str> = Arc::from(attr.name.as_str());
                cx.profile_attrs.insert(name.clone());
                (Node::Profile(name), plain(Type::Any))
            }
            ExprKind::Has(attr) => {
                let name: Arc<str> = Arc::from(attr.name.as_str());
                cx.profile_attrs.insert(name.clone());
                (Node::Has(name), plain(Type::Bool))
            }
            ExprKind::Name(parts) if in_where => {
                let path: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
                (Node::Prop(Arc::from(path.join("."))), plain(Type::Any))
            }
            ExprKind::Name(parts) => self.reference(parts, e.span, cx),
            ExprKind::Agg(agg) => {
                if in_where {
                    cx.diags.push(
                        Diagnostic::new(
                            Code::E0207,
                            e.span,
                            format!("`{}(...)` inside `where`", agg.func.name()),
                        )
                        .with_hint(
                            "`where` filters single events by their properties; aggregates belong outside it",
                        ),
                    );
                    return (Node::Const(Value::Null), plain(Type::Any));
                }
                self.aggregate(agg, cx)
            }
            ExprKind::Unary(UnaryOp::Not, inner) => {
                let (node, t) = self.node(inner, cx, in_where);
                self.require_bool(t.ty, "not", inner, cx);
                (Node::Not(Box::new(node)), plain(Type::Bool))
            }
            ExprKind::Unary(UnaryOp::Neg, inner) => {
                let (node, t) = self.node(inner, cx, in_where);
                if !matches!(t.ty, Type::Num | Type::Dur | Type::Any | Type::Null) {
                    cx.diags.push(Diagnostic::new(
                        Code::E0302,
                        e.span,
                        format!("cannot negate a {}", t.ty),
                    ));
                }
                (Node::Neg(Box::new(node)), t)
            }
            ExprKind::Binary(op, l, r) => self.binary(*op, l, r, e.span, cx, in_where),
        }
    }

    fn reference(&mut self, parts: &[ast::Ident], span: Span, cx: &mut DefContext) -> (Node, Typed) {
        let unknown = Typed {
            ty: Type::Any,
            now_dependent: false,
        };
        if parts.len() > 1 {
            let text: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
            cx.diags.push(
                Diagnostic::new(Code::E0208, span, format!("`{}` is not a definition", text.join(".")))
                    .with_hint(format!(
                        "profile attributes are written `profile.{}`; event properties are read by aggregates like `last({})` or inside `where`",
                        text[1..].join("."),
                        text.join(".")
                    )),
            );
            return (Node::Const(Value::Null), unknown);
        }
        let name = &parts[0];
        let Some(&i) = self.names.get(name.name.as_str()) else {
            let mut d = Diagnostic::new(Code::E0202, name.span, format!("unknown name `{}`", name.name));
            let candidates = self.file.defs.iter().map(|d| d.name.name.as_str());
            if let Some(s) = did_you_mean(&name.name, candidates) {
                d = d.with_hint(format!("did you mean `{s}`?"));
            } else if self.is_event_type(&name.name) {
                d = d.with_hint(format!(
                    "`{0}` is an event type; count its events with `count({0}, 30d)`",
                    name.name
                ));
            } else {
                d = d.with_hint("define it with `trait`, `tag` or `segment`; read a profile attribute with `profile.NAME`");
            }
            cx.diags.push(d);
            return (Node::Const(Value::Null), unknown);
        };
        cx.deps.insert(i);
        match &self.defs[i] {
            Some(dep) => {
                let ty = if dep.kind == DefKind::Trait {
                    dep.ty
                } else {
                    Type::Bool
                };
                (
                    Node::Def(i),
                    Typed {
                        ty,
                        now_dependent: dep.uses_since,
                    },
                )
            }
            // A definition in a cycle: already reported.
            None => (Node::Def(i), unknown),
        }
    }

    fn is_event_type(&self, name: &str) -> bool {
        fn walk(e: &Expr, name: &str) -> bool {
            match &e.kind {
                ExprKind::Agg(a) => a.event_type.name == name,
                ExprKind::List(items) => items.iter().any(|i| walk(i, name)),
                ExprKind::Unary(_, i) => walk(i, name),
                ExprKind::Binary(_, l, r) => walk(l, name) || walk(r, name),
                _ => false,
            }
        }
        self.file.defs.iter().any(|d| match &d.body {
            DefBody::EventTag { event_type, .. } => event_type.name == name,
            DefBody::Trait(e) | DefBody::Segment(e) | DefBody::ConditionTag { expr: e, .. } => walk(e, name),
        })
    }

    fn aggregate(&mut self, agg: &ast::Aggregate, cx: &mut DefContext) -> (Node, Typed) {
        let func = agg.func;
        let fname = func.name();
        let span = agg.func_span;
        match (func.takes_window(), &agg.window) {
            (true, None) => cx.diags.push(
                Diagnostic::new(Code::E0205, span, format!("`{fname}` needs a window")).with_hint(format!(
                    "add one, like `{}, 30d)` or `, lifetime)`",
                    agg.to_string().trim_end_matches(')')
                )),
            ),
            (false, Some((_, wspan))) => {
                cx.diags.push(
                    Diagnostic::new(Code::E0206, *wspan, format!("`{fname}` takes no window")).with_hint(
                        format!(
                        "`{fname}` looks at the {} matching event, whenever it happened; remove the window",
                        if func == AggFunc::First { "oldest" } else { "newest" }
                    ),
                    ),
                )
            }
            (true, Some((Window::Span(ms), wspan))) if *ms <= 0 => cx.diags.push(Diagnostic::new(
                Code::E0305,
                *wspan,
                "a window must be longer than zero",
            )),
            _ => {}
        }
        if func.takes_property() && agg.property.is_empty() {
            cx.diags.push(
                Diagnostic::new(
                    Code::E0210,
                    agg.event_type.span,
                    format!("`{fname}` needs a property of `{}`", agg.event_type.name),
                )
                .with_hint(format!(
                    "name the property, like `{fname}({}.amount, ...)`",
                    agg.event_type.name
                )),
            );
        } else if !func.takes_property() && !agg.property.is_empty() {
            let prop_span = agg.property[0].span.to(agg.property[agg.property.len() - 1].span);
            cx.diags.push(
                Diagnostic::new(
                    Code::E0210,
                    prop_span,
                    format!("`{fname}` takes an event type, not a property"),
                )
                .with_hint(format!(
                    "write `{fname}({} ...)`; filter by a property with `where`",
                    agg.event_type.name
                )),
            );
        }
        // The filter's own profile reads, even those the definition made before it: the
        // aggregate is shared by every definition using it and must be rebuilt when any of
        // them changes.
        let before = std::mem::take(&mut cx.profile_attrs);
        let filter = agg.filter.as_ref().map(|f| {
            let (node, t) = self.filter(f, cx);
            if matches!(t.ty, Type::Num | Type::Str | Type::Dur | Type::List | Type::Null) {
                cx.diags.push(
                    Diagnostic::new(
                        Code::E0303,
                        f.span,
                        format!("this `where` is a {}, not a bool", t.ty),
                    )
                    .with_hint("`where` needs a condition, like `category == \"seafood\"`"),
                );
            }
            node
        });
        let profile_reads: Vec<Arc<str>> = cx.profile_attrs.iter().cloned().collect();
        cx.profile_attrs.extend(before);
        let event_type: Arc<str> = Arc::from(agg.event_type.name.as_str());
        cx.event_types.insert(event_type.clone());
        cx.time_dependent = true;
        let text = agg.to_string();
        let id = match self.agg_index.get(&text) {
            Some(&id) => id,
            None => {
                let id = self.aggregates.len();
                let property = (!agg.property.is_empty()).then(|| {
                    let path: Vec<&str> = agg.property.iter().map(|p| p.name.as_str()).collect();
                    Arc::from(path.join("."))
                });
                self.aggregates.push(AggSpec {
                    func,
                    event_type,
                    property,
                    filter,
                    window: agg.window.map(|(w, _)| w),
                    profile_reads,
                    text: text.clone(),
                    source: 0,
                    position: 0,
                    slot: None,
                });
                self.agg_index.insert(text, id);
                id
            }
        };
        cx.aggs.insert(id);
        let ty = match func {
            AggFunc::Count
            | AggFunc::Sum
            | AggFunc::Avg
            | AggFunc::Min
            | AggFunc::Max
            | AggFunc::Distinct => Type::Num,
            AggFunc::Last | AggFunc::First => Type::Any,
            AggFunc::Since => Type::Dur,
        };
        (
            Node::Agg(id),
            Typed {
                ty,
                now_dependent: func == AggFunc::Since,
            },
        )
    }

    fn require_bool(&self, ty: Type, op: &str, operand: &Expr, cx: &mut DefContext) {
        if matches!(ty, Type::Bool | Type::Any | Type::Null) {
            return;
        }
        let text = &self.source[operand.span.start..operand.span.end];
        let hint = match ty {
            Type::Num => format!("compare the number, like `{text} >= 1`"),
            Type::Dur => format!("compare the duration, like `{text} > 45m`"),
            Type::Str => format!("compare the string, like `{text} == \"...\"`"),
            _ => "use a condition that is true or false".to_owned(),
        };
        cx.diags.push(
            Diagnostic::new(
                Code::E0302,
                operand.span,
                format!("`{op}` needs a bool, found a {ty}"),
            )
            .with_hint(hint),
        );
    }

    fn binary(
        &mut self,
        op: BinaryOp,
        l: &Expr,
        r: &Expr,
        span: Span,
        cx: &mut DefContext,
        in_where: bool,
    ) -> (Node, Typed) {
        let (ln, lt) = self.node(l, cx, in_where);
        let (rn, rt) = self.node(r, cx, in_where);
        let concrete = |t: Type| !matches!(t, Type::Any | Type::Null);
        let bool_result = Typed {
            ty: Type::Bool,
            now_dependent: false,
        };
        let typed = match op {
            BinaryOp::And | BinaryOp::Or => {
                self.require_bool(lt.ty, op.symbol(), l, cx);
                self.require_bool(rt.ty, op.symbol(), r, cx);
                bool_result
            }
            BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => {
                if lt.ty == Type::Null || rt.ty == Type::Null {
                    cx.diags.push(
                        Diagnostic::new(
                            Code::E0301,
                            span,
                            format!(
                                "comparing with `null` is always false, `{}` included",
                                op.symbol()
                            ),
                        )
                        .with_hint("test whether a profile attribute is set with `has(profile.NAME)`"),
                    );
                } else if concrete(lt.ty) && concrete(rt.ty) && lt.ty != rt.ty {
                    let mut d = Diagnostic::new(
                        Code::E0301,
                        span,
                        format!("cannot compare a {} with a {}", lt.ty, rt.ty),
                    );
                    if matches!((lt.ty, rt.ty), (Type::Dur, Type::Num) | (Type::Num, Type::Dur)) {
                        d = d.with_hint("write the number as a duration with a unit, like `45m` or `3d`");
                    }
                    cx.diags.push(d);
                } else if !matches!(op, BinaryOp::Eq | BinaryOp::Ne) {
                    for (t, e) in [(lt.ty, l), (rt.ty, r)] {
                        if matches!(t, Type::Bool | Type::List) {
                            cx.diags.push(Diagnostic::new(
                                Code::E0302,
                                e.span,
                                format!(
                                    "`{}` orders numbers, durations and strings, not a {t}",
                                    op.symbol()
                                ),
                            ));
                        }
                    }
                }
                if lt.now_dependent || rt.now_dependent {
                    cx.time_comparisons.push((op, ln.clone(), rn.clone()));
                }
                bool_result
            }
            BinaryOp::In => {
                if concrete(rt.ty) && rt.ty != Type::List {
                    cx.diags.push(
                        Diagnostic::new(
                            Code::E0302,
                            r.span,
                            format!("`in` needs a list on its right, found a {}", rt.ty),
                        )
                        .with_hint(
                            "write the choices as a list, like `profile.city in [\"杭州\", \"上海\"]`",
                        ),
                    );
                }
                if lt.now_dependent {
                    if let Node::Const(Value::List(items)) = &rn {
                        for item in items.iter() {
                            cx.time_comparisons
                                .push((BinaryOp::Eq, ln.clone(), Node::Const(item.clone())));
                        }
                    }
                }
                bool_result
            }
            BinaryOp::Contains => {
                if concrete(lt.ty) && !matches!(lt.ty, Type::Str | Type::List) {
                    cx.diags.push(Diagnostic::new(
                        Code::E0302,
                        l.span,
                        format!("`contains` looks into a string or a list, not a {}", lt.ty),
                    ));
                }
                bool_result
            }
            BinaryOp::StartsWith => {
                for (t, e) in [(lt.ty, l), (rt.ty, r)] {
                    if concrete(t) && t != Type::Str {
                        cx.diags.push(Diagnostic::new(
                            Code::E0302,
                            e.span,
                            format!("`starts_with` needs strings, found a {t}"),
                        ));
                    }
                }
                bool_result
            }
            BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div => {
                self.arithmetic(op, (lt, l), (rt, r), span, cx)
            }
        };
        (Node::Binary(op, Box::new(ln), Box::new(rn)), typed)
    }

    fn arithmetic(
        &self,
        op: BinaryOp,
        (lt, l): (Typed, &Expr),
        (rt, r): (Typed, &Expr),
        span: Span,
        cx: &mut DefContext,
    ) -> Typed {
        let mut bad = false;
        for (t, e) in [(lt.ty, l), (rt.ty, r)] {
            if matches!(t, Type::Str | Type::Bool | Type::List) {
                cx.diags.push(Diagnostic::new(
                    Code::E0302,
                    e.span,
                    format!("`{}` works on numbers and durations, not a {t}", op.symbol()),
                ));
                bad = true;
            }
        }
        let now_dependent = lt.now_dependent || rt.now_dependent;
        let nonlinear = match op {
            BinaryOp::Mul => lt.now_dependent && rt.now_dependent,
            BinaryOp::Div => rt.now_dependent,
            _ => false,
        };
        if nonlinear {
            cx.diags.push(
                Diagnostic::new(
                    Code::E0304,
                    span,
                    if op == BinaryOp::Mul {
                        "`since(...)` on both sides of `*`"
                    } else {
                        "dividing by a value that grows with time (`since(...)`)"
                    },
                )
                    .with_hint("values that grow with time may be added, subtracted, and multiplied or divided by values that do not"),
            );
        }
        if bad {
            return Typed {
                ty: Type::Any,
                now_dependent,
            };
        }
        use Type::{Any, Dur, Null, Num};
        let ty = match (op, lt.ty, rt.ty) {
            (_, Any | Null, _) | (_, _, Any | Null) => Any,
            (BinaryOp::Add | BinaryOp::Sub, Num, Num) => Num,
            (BinaryOp::Add | BinaryOp::Sub, Dur, Dur) => Dur,
            (BinaryOp::Mul, Num, Num) => Num,
            (BinaryOp::Mul, Num, Dur) | (BinaryOp::Mul, Dur, Num) => Dur,
            (BinaryOp::Div, Num, Num) | (BinaryOp::Div, Dur, Dur) => Num,
            (BinaryOp::Div, Dur, Num) => Dur,
            (op, a, b) => {
                let verb = match op {
                    BinaryOp::Add => "add",
                    BinaryOp::Sub => "subtract",
                    BinaryOp::Mul => "multiply",
                    _ => "divide",
                };
                let mut d = Diagnostic::new(Code::E0301, span, format!("cannot {verb} a {a} and a {b}"));
                if matches!((a, b), (Dur, Num) | (Num, Dur)) && matches!(op, BinaryOp::Add | BinaryOp::Sub) {
                    d = d.with_hint("write the number as a duration with a unit, like `45m`");
                }
                cx.diags.push(d);
                Any
            }
        };
        Typed { ty, now_dependent }
    }
}

fn def_kind(body: &DefBody) -> DefKind {
    match body {
        DefBody::Trait(_) => DefKind::Trait,
        DefBody::ConditionTag { .. } => DefKind::ConditionTag,
        DefBody::EventTag { .. } => DefKind::EventTag,
        DefBody::Segment(_) => DefKind::Segment,
    }
}

impl CompiledRules {
    /// A readable account of the compiled plan: evaluation order, shared aggregates, and
    /// which definitions each event type and profile attribute can change.
    pub fn describe_plan(&self) -> String {
        use std::fmt::Write as _;
        let names = |ids: &[DefId]| -> String {
            ids.iter()
                .map(|&i| &*self.defs[i].name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = String::new();
        let _ = writeln!(out, "evaluation order:");
        for &i in &self.order {
            let def = &self.defs[i];
            let kind = match def.kind {
                DefKind::Trait => format!("trait ({})", def.ty),
                DefKind::ConditionTag => "tag".to_owned(),
                DefKind::EventTag => "event tag".to_owned(),
                DefKind::Segment => "segment".to_owned(),
            };
            let mut notes = Vec::new();
            if !def.deps.is_empty() {
                notes.push(format!("reads {}", names(&def.deps)));
            }
            if def.time_dependent {
                notes.push("changes with time".to_owned());
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!("  [{}]", notes.join("; "))
            };
            let _ = writeln!(out, "  {} {kind}{notes}", def.name);
        }
        let _ = writeln!(out, "aggregates:");
        for (id, agg) in self.aggregates.iter().enumerate() {
            let _ = writeln!(out, "  #{id} {}", agg.text);
        }
        let mut types: Vec<_> = self.by_event_type.iter().collect();
        types.sort();
        let _ = writeln!(out, "event types:");
        for (t, ids) in types {
            let _ = writeln!(out, "  {t} -> {}", names(ids));
        }
        let mut attrs: Vec<_> = self.by_profile_attr.iter().collect();
        attrs.sort();
        let _ = writeln!(out, "profile attributes:");
        for (a, ids) in attrs {
            let _ = writeln!(out, "  {a} -> {}", names(ids));
        }
        if !self.time_comparisons.is_empty() {
            let _ = writeln!(out, "since thresholds:");
            let mut seen = Vec::new();
            for (i, ..) in &self.time_comparisons {
                if !seen.contains(i) {
                    seen.push(*i);
                    let _ = writeln!(out, "  {}", self.defs[*i].name);
                }
            }
        }
        out
    }
}

/// FNV-1a over the layout's debug text: stable across processes and builds of the same
/// version (unlike std's hasher), which is what state written to disk needs.
fn window_layout(sources: &[AggSource], aggregates: &[AggSpec]) -> u64 {
    let shape: Vec<_> = sources
        .iter()
        .map(|s| {
            let aggs: Vec<_> = s
                .aggregates
                .iter()
                .map(|&a| (aggregates[a].func, aggregates[a].window, aggregates[a].slot))
                .collect();
            (&s.event_type, &s.filter, &s.properties, aggs)
        })
        .collect();
    format!("{shape:?}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_over_the_same_events_share_a_source_and_its_input_columns() {
        let rules = CompiledRules::compile(
            "trait a = sum(pay.amount, 30d) + avg(pay.amount, 90d) + count(pay, lifetime)
             trait b = max(pay.fee, 7d) + count(pay where amount > 5, 1d) + count(view, 1d)",
        )
        .unwrap();
        let sources = rules.aggregate_sources();
        assert_eq!(sources.len(), 3, "pay, pay where …, view");
        let by_text = |t: &str| rules.aggregates().iter().find(|a| a.text == t).unwrap();
        let sum = by_text("sum(pay.amount, 30d)");
        let avg = by_text("avg(pay.amount, 90d)");
        let count = by_text("count(pay, lifetime)");
        let max = by_text("max(pay.fee, 7d)");
        assert_eq!([sum.source, avg.source, count.source], [sum.source; 3]);
        assert_eq!(max.source, sum.source);
        assert_eq!(sum.slot, avg.slot, "one column for `amount`");
        assert_ne!(max.slot, sum.slot);
        assert_eq!(count.slot, None);
        assert_eq!(sources[sum.source].properties.len(), 2);
        assert_eq!(sources[sum.source].aggregates.len(), 4);
        for (id, agg) in rules.aggregates().iter().enumerate() {
            assert_eq!(sources[agg.source].aggregates[agg.position], id);
        }
        assert_eq!(rules.sources_for_event_type("pay").len(), 2);
    }

    #[test]
    fn an_aggregate_knows_every_profile_attribute_its_filter_reads() {
        // The definition reads `profile.vip` before the filter does: the aggregate must still
        // list it, or a change of `vip` would not rebuild its window.
        let rules = CompiledRules::compile(
            "tag t = profile.vip == true and count(pay where profile.vip == true, 1d) >= 1",
        )
        .unwrap();
        let vip: Arc<str> = Arc::from("vip");
        assert_eq!(rules.aggregates()[0].profile_reads, std::slice::from_ref(&vip));
        assert_eq!(rules.aggregate_sources()[0].profile_reads, [vip]);
        assert!(rules.def(0).profile_attrs.contains("vip"));
    }
}
