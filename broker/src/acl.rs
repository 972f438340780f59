//! Topic authorization: which topics a connection may publish to and which
//! filters it may subscribe to, in the style of AWS IoT policies and
//! Mosquitto ACL patterns.
//!
//! A policy is two lists of MQTT 3.1.1 topic filters. Filters may contain
//! `${client_id}` and `${username}`, substituted when a policy is bound to a
//! connection ([`Acl::bind`]). A substituted value may never change the
//! meaning of a filter: a client id or username that is empty or contains
//! `/`, `+`, `#` or NUL denies the connection everything instead.
//!
//! - PUBLISH to a topic is allowed if any `publish` filter matches the topic
//!   ([`filter_matches`]).
//! - SUBSCRIBE to a filter is allowed if any `subscribe` filter covers it,
//!   i.e. every topic the requested filter could match is matched by the
//!   allowed filter ([`filter_covers`]).
//!
//! Topic semantics follow MQTT 3.1.1: levels are separated by `/`, `+`
//! matches exactly one level, `#` (only as the whole last level) matches the
//! parent level and every level below it, and topics whose first level starts
//! with `$` are never matched by a filter whose first level is `+` or `#`.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// One named policy: the topic filters a client may publish and subscribe to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Topic filters the client may PUBLISH to (a topic is allowed if any
    /// filter matches it).
    pub publish: Vec<String>,
    /// Topic filters the client may SUBSCRIBE to (a requested filter is
    /// allowed if it is covered by any of these: every topic the requested
    /// filter could match is matched by the allowed filter).
    pub subscribe: Vec<String>,
}

/// The `[acl]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Named policies. Filters may contain `${client_id}` and `${username}`,
    /// substituted per connection. Policies given in the configuration are
    /// merged over the built-in `device` and `anonymous` policies (a policy
    /// with the same name replaces the built-in one).
    #[serde(deserialize_with = "deserialize_policies")]
    pub policies: BTreeMap<String, Policy>,
    /// Policy for devices (default "device").
    pub device_policy: String,
    /// Policy for anonymous clients when anonymous access is allowed
    /// (default "anonymous").
    pub anonymous_policy: String,
}

/// Name of the built-in device policy.
pub const DEFAULT_DEVICE_POLICY: &str = "device";
/// Name of the built-in anonymous policy.
pub const DEFAULT_ANONYMOUS_POLICY: &str = "anonymous";

fn default_policies() -> BTreeMap<String, Policy> {
    let mut policies = BTreeMap::new();
    policies.insert(
        DEFAULT_DEVICE_POLICY.to_owned(),
        Policy {
            publish: vec!["devices/${client_id}/#".to_owned()],
            subscribe: vec!["devices/${client_id}/#".to_owned()],
        },
    );
    policies.insert(
        DEFAULT_ANONYMOUS_POLICY.to_owned(),
        Policy {
            publish: vec!["#".to_owned()],
            subscribe: vec!["#".to_owned(), "$sluice/#".to_owned()],
        },
    );
    policies
}

/// Deserialises the user's policies and merges them over the defaults.
fn deserialize_policies<'de, D>(deserializer: D) -> Result<BTreeMap<String, Policy>, D::Error>
where
    D: Deserializer<'de>,
{
    let user = BTreeMap::<String, Policy>::deserialize(deserializer)?;
    let mut policies = default_policies();
    policies.extend(user);
    Ok(policies)
}

impl Default for AclConfig {
    fn default() -> Self {
        Self {
            policies: default_policies(),
            device_policy: DEFAULT_DEVICE_POLICY.to_owned(),
            anonymous_policy: DEFAULT_ANONYMOUS_POLICY.to_owned(),
        }
    }
}

/// Which list of a policy a filter came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterList {
    Publish,
    Subscribe,
}

impl fmt::Display for FilterList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FilterList::Publish => "publish",
            FilterList::Subscribe => "subscribe",
        })
    }
}

/// An invalid ACL configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    /// `device_policy` or `anonymous_policy` names a policy that is not defined.
    #[error("acl: {setting} = \"{name}\" names a policy that is not defined")]
    UnknownPolicy {
        /// The setting that refers to the policy (`device_policy`, `anonymous_policy`).
        setting: &'static str,
        name: String,
    },
    /// A filter is not a valid MQTT topic filter.
    #[error("acl: policy \"{policy}\", {list} filter \"{filter}\" is invalid: {reason}")]
    InvalidFilter {
        policy: String,
        list: FilterList,
        filter: String,
        reason: &'static str,
    },
    /// A filter uses a `${variable}` other than `${client_id}` and `${username}`.
    #[error(
        "acl: policy \"{policy}\", {list} filter \"{filter}\" uses unknown variable \
         \"${{{variable}}}\" (known: ${{client_id}}, ${{username}})"
    )]
    UnknownVariable {
        policy: String,
        list: FilterList,
        filter: String,
        variable: String,
    },
}

/// One piece of a filter template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    ClientId,
    Username,
}

/// A validated filter with its `${...}` variables parsed out.
#[derive(Debug, Clone)]
struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses and validates `filter`. On error returns the reason, or the
    /// name of an unknown variable.
    fn parse(filter: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = filter;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(TemplateError::Invalid(
                    "unterminated \"${\" (expected ${client_id} or ${username})",
                ));
            };
            parts.push(match &after[..end] {
                "client_id" => Part::ClientId,
                "username" => Part::Username,
                other => return Err(TemplateError::UnknownVariable(other.to_owned())),
            });
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        let template = Template { parts };
        // Substituted values never contain '/', '+', '#' or NUL and are never
        // empty, so validating with a plain placeholder validates every
        // possible substitution.
        validate_filter(&template.render("x", "x")).map_err(TemplateError::Invalid)?;
        Ok(template)
    }

    fn render(&self, client_id: &str, username: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            out.push_str(match part {
                Part::Literal(s) => s,
                Part::ClientId => client_id,
                Part::Username => username,
            });
        }
        out
    }

    fn uses(&self, wanted: &Part) -> bool {
        self.parts.contains(wanted)
    }
}

enum TemplateError {
    Invalid(&'static str),
    UnknownVariable(String),
}

#[derive(Debug, Clone)]
struct CompiledPolicy {
    publish: Vec<Template>,
    subscribe: Vec<Template>,
}

impl CompiledPolicy {
    fn compile(name: &str, policy: &Policy) -> Result<Self, AclError> {
        let compile_list = |list: FilterList, filters: &[String]| {
            filters
                .iter()
                .map(|filter| {
                    Template::parse(filter).map_err(|e| match e {
                        TemplateError::Invalid(reason) => AclError::InvalidFilter {
                            policy: name.to_owned(),
                            list,
                            filter: filter.clone(),
                            reason,
                        },
                        TemplateError::UnknownVariable(variable) => AclError::UnknownVariable {
                            policy: name.to_owned(),
                            list,
                            filter: filter.clone(),
                            variable,
                        },
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            publish: compile_list(FilterList::Publish, &policy.publish)?,
            subscribe: compile_list(FilterList::Subscribe, &policy.subscribe)?,
        })
    }

    fn uses(&self, wanted: &Part) -> bool {
        self.publish
            .iter()
            .chain(&self.subscribe)
            .any(|t| t.uses(wanted))
    }
}

/// Validated policies, ready to be bound to connections.
#[derive(Debug, Clone)]
pub struct Acl {
    policies: BTreeMap<String, CompiledPolicy>,
    device_policy: String,
    anonymous_policy: String,
}

impl Acl {
    /// Validates every filter of every policy, and that the device and
    /// anonymous policy names exist.
    pub fn new(config: &AclConfig) -> Result<Self, AclError> {
        let policies = config
            .policies
            .iter()
            .map(|(name, policy)| Ok((name.clone(), CompiledPolicy::compile(name, policy)?)))
            .collect::<Result<BTreeMap<_, _>, AclError>>()?;
        for (setting, name) in [
            ("device_policy", &config.device_policy),
            ("anonymous_policy", &config.anonymous_policy),
        ] {
            if !policies.contains_key(name) {
                return Err(AclError::UnknownPolicy {
                    setting,
                    name: name.clone(),
                });
            }
        }
        Ok(Self {
            policies,
            device_policy: config.device_policy.clone(),
            anonymous_policy: config.anonymous_policy.clone(),
        })
    }

    /// Whether a policy with this name is defined.
    pub fn has_policy(&self, name: &str) -> bool {
        self.policies.contains_key(name)
    }

    /// The policy for devices (`device_policy`); always defined.
    pub fn device_policy(&self) -> &str {
        &self.device_policy
    }

    /// The policy for anonymous clients (`anonymous_policy`); always defined.
    pub fn anonymous_policy(&self) -> &str {
        &self.anonymous_policy
    }

    /// Binds a policy to one connection, substituting `${client_id}` and
    /// `${username}`.
    ///
    /// Returns `None` (the caller should deny everything) if the policy is not
    /// defined, or if a value the policy uses would change a filter's meaning:
    /// empty, or containing `/`, `+`, `#` or NUL. A client id can never widen
    /// its own access. Values the policy does not use are not checked (an
    /// anonymous client has an empty username).
    pub fn bind(&self, policy: &str, client_id: &str, username: &str) -> Option<ClientAcl> {
        let compiled = self.policies.get(policy)?;
        if compiled.uses(&Part::ClientId) && !is_safe_value(client_id) {
            return None;
        }
        if compiled.uses(&Part::Username) && !is_safe_value(username) {
            return None;
        }
        let render = |templates: &[Template]| {
            templates
                .iter()
                .map(|t| t.render(client_id, username))
                .collect::<Vec<_>>()
        };
        Some(ClientAcl {
            publish: render(&compiled.publish),
            subscribe: render(&compiled.subscribe),
        })
    }
}

/// Whether a substituted value keeps a filter's meaning.
fn is_safe_value(value: &str) -> bool {
    !value.is_empty() && !value.contains(['/', '+', '#', '\0'])
}

/// The permissions of one connection: a policy with its variables substituted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientAcl {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl ClientAcl {
    /// Permissions that deny every publish and every subscribe.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Whether the connection may PUBLISH to `topic` (a topic name, not a
    /// filter: a name containing wildcards is denied).
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|f| filter_matches(f, topic))
    }

    /// Whether the connection may SUBSCRIBE to `filter`: some allowed filter
    /// matches every topic `filter` could match. Invalid filters are denied.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.subscribe
            .iter()
            .any(|allowed| filter_covers(allowed, filter))
    }

    /// The substituted publish filters (for logging).
    pub fn publish_filters(&self) -> &[String] {
        &self.publish
    }

    /// The substituted subscribe filters (for logging).
    pub fn subscribe_filters(&self) -> &[String] {
        &self.subscribe
    }
}

/// Checks MQTT 3.1.1 topic filter syntax: non-empty, `#` only as the whole
/// last level, `+` only as a whole level, no NUL.
fn validate_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("filter is empty");
    }
    if filter.contains('\0') {
        return Err("filter contains a NUL character");
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err("'#' must be the whole last level");
        }
        if level.contains('+') && level != "+" {
            return Err("'+' must be a whole level");
        }
    }
    Ok(())
}

/// Checks MQTT 3.1.1 topic name syntax: non-empty, no wildcards, no NUL.
fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

fn is_wildcard(level: &str) -> bool {
    level == "+" || level == "#"
}

/// Whether topic filter `filter` matches topic name `topic` (MQTT 3.1.1
/// §4.7). `a/#` matches `a` and everything below it; `+` matches exactly one
/// level (possibly empty); a topic whose first level starts with `$` is not
/// matched by a filter whose first level is a wildcard.
///
/// Returns `false` if `filter` is not a valid filter or `topic` is not a valid
/// topic name.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if validate_filter(filter).is_err() || !is_valid_topic_name(topic) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    let mut first = true;
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), topic_level) => {
                // `#` matches its parent level and everything below.
                return !(first && topic_level.is_some_and(|t| t.starts_with('$')));
            }
            (Some("+"), Some(t)) => {
                if first && t.starts_with('$') {
                    return false;
                }
            }
            (Some(f), Some(t)) => {
                if f != t {
                    return false;
                }
            }
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
        }
        first = false;
    }
}

/// Whether allowed filter `allowed` covers requested filter `requested`:
/// every topic `requested` could match is also matched by `allowed`.
///
/// For example `devices/d1/#` covers `devices/d1/#`, `devices/d1/+/x` and
/// `devices/d1`, but not `devices/#`; `#` covers every filter except those
/// whose first level starts with `$`.
///
/// Returns `false` if either is not a valid filter.
pub fn filter_covers(allowed: &str, requested: &str) -> bool {
    if validate_filter(allowed).is_err() || validate_filter(requested).is_err() {
        return false;
    }
    // A trailing `#` also matches its parent topic, unless that would be the
    // empty topic, which is not a valid name. So `#` matches exactly what
    // `+/#` matches, and `/#` what `/+/#` matches; comparing them in that
    // form lets an allowed `+/#` cover a requested `#`.
    let requested = match requested {
        "#" => "+/#",
        "/#" => "/+/#",
        other => other,
    };
    let mut allowed_levels = allowed.split('/');
    let mut requested_levels = requested.split('/');
    let mut first = true;
    loop {
        match (allowed_levels.next(), requested_levels.next()) {
            // Requested `$...` topics are never matched by a leading wildcard.
            (Some(a), Some(r)) if first && is_wildcard(a) && r.starts_with('$') => return false,
            // `#` matches this level (or the parent, if `requested` ends here)
            // and everything below, which is all `requested` can match.
            (Some("#"), _) => return true,
            // `+` matches one level: a literal or `+`, but not `#` (which also
            // matches deeper levels and the parent level).
            (Some("+"), Some(r)) => {
                if r == "#" {
                    return false;
                }
            }
            // A literal only covers the same literal.
            (Some(a), Some(r)) => {
                if a != r {
                    return false;
                }
            }
            (None, None) => return true,
            // `allowed` has more levels that aren't `#`: they don't match the
            // topic that ends here. `requested` has more levels: `allowed`
            // doesn't match topics that deep.
            (Some(_), None) | (None, Some(_)) => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_matches_table() {
        let cases: &[(&str, &str, bool)] = &[
            // Exact.
            ("a", "a", true),
            ("a/b/c", "a/b/c", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("a/b", "a/c", false),
            ("A", "a", false),
            // `+` matches exactly one level.
            ("+", "a", true),
            ("+", "a/b", false),
            ("a/+", "a/b", true),
            ("a/+", "a", false),
            ("a/+", "a/b/c", false),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/b/d", false),
            ("+/+", "a/b", true),
            ("+/+", "/b", true),
            ("+/+", "a/", true),
            ("a/+", "a/", true), // empty level
            ("+", "/", false),
            ("+/+", "/", true),
            ("/+", "/a", true),
            // `#` matches the parent level and everything below.
            ("#", "a", true),
            ("#", "a/b/c", true),
            ("#", "/", true),
            ("#", "/a", true),
            ("a/#", "a", true),
            ("a/#", "a/b", true),
            ("a/#", "a/b/c", true),
            ("a/#", "a/", true),
            ("a/#", "ab", false),
            ("a/#", "b/a", false),
            ("a/b/#", "a", false),
            ("a/+/#", "a/b", true),
            ("a/+/#", "a", false),
            ("+/#", "a", true),
            // `$` topics are not matched by a leading wildcard…
            ("#", "$SYS", false),
            ("#", "$SYS/broker", false),
            ("+", "$SYS", false),
            ("+/broker", "$SYS/broker", false),
            ("+/#", "$SYS/broker", false),
            // …but are by a literal first level, and `$` elsewhere is plain.
            ("$SYS/#", "$SYS/broker", true),
            ("$SYS/#", "$SYS", true),
            ("$sluice/presence/+", "$sluice/presence/d1", true),
            ("$sluice/presence/+", "$sluice/presence/d1/x", false),
            ("$sluice/+/d1", "$sluice/presence/d1", true),
            ("a/+", "a/$b", true),
            ("a/#", "a/$b", true),
            ("#", "a$", true),
            // Invalid filters never match.
            ("", "a", false),
            ("a/#/b", "a/x/b", false),
            ("a#", "a#", false),
            ("a/b#", "a/b", false),
            ("a+", "a+", false),
            ("a/+b", "a/+b", false),
            ("a\0", "a\0", false),
            // Invalid topic names never match.
            ("#", "", false),
            ("#", "a/+", false),
            ("#", "a/#", false),
            ("a/+", "a/+", false),
            ("#", "a\0b", false),
        ];
        for &(filter, topic, expected) in cases {
            assert_eq!(
                filter_matches(filter, topic),
                expected,
                "filter_matches({filter:?}, {topic:?})"
            );
        }
    }

    #[test]
    fn filter_covers_table() {
        let cases: &[(&str, &str, bool)] = &[
            // The examples from the design.
            ("devices/d1/#", "devices/d1/#", true),
            ("devices/d1/#", "devices/d1/+/x", true),
            ("devices/d1/#", "devices/d1", true),
            ("devices/d1/#", "devices/d1/telemetry", true),
            ("devices/d1/#", "devices/d1/+", true),
            ("devices/d1/#", "devices/#", false),
            ("devices/d1/#", "devices/+/x", false),
            ("devices/d1/#", "devices/+", false),
            ("devices/d1/#", "devices", false),
            ("devices/d1/#", "devices/d2/#", false),
            ("devices/d1/#", "devices/d10", false),
            ("devices/d1/#", "#", false),
            ("devices/+/telemetry", "devices/+/telemetry", true),
            ("devices/+/telemetry", "devices/d7/telemetry", true),
            ("devices/+/telemetry", "devices/#", false),
            ("devices/+/telemetry", "devices/+/+", false),
            ("devices/+/telemetry", "devices/+/#", false),
            ("devices/+/telemetry", "devices/+/telemetry/#", false),
            ("devices/+/telemetry", "devices/+/telemetry/x", false),
            ("devices/+/telemetry", "devices/+", false),
            ("devices/+/telemetry", "devices/d7", false),
            // `#` covers everything except `$` filters.
            ("#", "#", true),
            ("#", "+", true),
            ("#", "a", true),
            ("#", "a/#", true),
            ("#", "+/+/#", true),
            ("#", "/", true),
            ("#", "a/$b", true),
            ("#", "$SYS", false),
            ("#", "$SYS/#", false),
            ("#", "$sluice/presence/+", false),
            ("$sluice/#", "$sluice/presence/+", true),
            ("$sluice/#", "$sluice/#", true),
            ("$sluice/#", "$sluice", true),
            ("$sluice/#", "#", false),
            ("$sluice/#", "+/presence", false),
            ("$sluice/#", "$other/#", false),
            // `+` covers one level, not `#`; and not `$` first levels.
            ("+", "a", true),
            ("+", "+", true),
            ("+", "#", false),
            ("+", "a/b", false),
            ("+/x", "a/x", true),
            ("+/x", "+/x", true),
            ("+/x", "$a/x", false),
            ("+/#", "$a/x", false),
            ("+/#", "+/x", true),
            ("+/#", "#", true), // a topic has at least one level
            ("+/#", "+", true),
            ("+/+/#", "#", false),
            ("+/+/#", "+/#", false),
            ("+/+/#", "+/+", true),
            ("/+/#", "/#", true), // the empty topic is not a valid name
            ("/+/#", "/", true),
            ("a/+/#", "a/#", false),
            ("a//+/#", "a//#", false), // `a//#` matches `a/`
            ("+/+", "+/#", false),
            ("a/+", "a/#", false), // `a/#` also matches `a`
            ("a/+/#", "a/#", false),
            ("a/+/#", "a/+", true),
            ("a/+/#", "a/+/b/#", true),
            // Literals.
            ("a/b", "a/b", true),
            ("a/b", "a/+", false),
            ("a/b", "a/#", false),
            ("a/b", "a", false),
            ("a/b", "a/b/c", false),
            ("a", "a/#", false),
            ("a//b", "a/+/b", false),
            ("a/+/b", "a//b", true),
            // Invalid filters are never covered and never cover.
            ("#", "", false),
            ("#", "a/#/b", false),
            ("#", "a/b#", false),
            ("#", "a+", false),
            ("a/#/b", "a/x/b", false),
            ("", "a", false),
            ("#", "a\0", false),
        ];
        for &(allowed, requested, expected) in cases {
            assert_eq!(
                filter_covers(allowed, requested),
                expected,
                "filter_covers({allowed:?}, {requested:?})"
            );
        }
    }

    /// `filter_covers` agrees with its definition checked over a finite
    /// universe of topics rich enough to hold a counterexample for every
    /// pair of filters of up to 3 levels.
    #[test]
    fn filter_covers_agrees_with_brute_force() {
        // Every topic name of up to 4 levels over an alphabet that contains
        // every filter literal plus one that none uses, and `$` first levels.
        let topic_alphabet = ["a", "b", "z", "$a", ""];
        let filter_alphabet = ["a", "b", "$a", "", "+", "#"];

        fn all_paths(alphabet: &[&str], max_levels: usize) -> Vec<String> {
            let mut out = Vec::new();
            let mut current: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
            for _ in 0..max_levels {
                out.extend(current.iter().cloned());
                current = current
                    .iter()
                    .flat_map(|p| alphabet.iter().map(move |l| format!("{p}/{l}")))
                    .collect();
            }
            out
        }

        let topics = all_paths(&topic_alphabet, 4);
        let filters: Vec<String> = all_paths(&filter_alphabet, 3)
            .into_iter()
            .filter(|f| validate_filter(f).is_ok())
            .collect();
        let matched: Vec<Vec<bool>> = filters
            .iter()
            .map(|f| topics.iter().map(|t| filter_matches(f, t)).collect())
            .collect();
        for (ai, allowed) in filters.iter().enumerate() {
            for (ri, requested) in filters.iter().enumerate() {
                let brute = matched[ri].iter().zip(&matched[ai]).all(|(&r, &a)| !r || a);
                assert_eq!(
                    filter_covers(allowed, requested),
                    brute,
                    "filter_covers({allowed:?}, {requested:?})"
                );
            }
        }
    }

    fn acl_with(policies: &[(&str, Policy)]) -> Result<Acl, AclError> {
        let mut config = AclConfig::default();
        for (name, policy) in policies {
            config.policies.insert(name.to_string(), policy.clone());
        }
        Acl::new(&config)
    }

    fn policy(publish: &[&str], subscribe: &[&str]) -> Policy {
        Policy {
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn default_config() {
        let config = AclConfig::default();
        assert_eq!(config.device_policy, "device");
        assert_eq!(config.anonymous_policy, "anonymous");
        assert_eq!(config.policies.len(), 2);
        assert_eq!(
            config.policies["device"],
            policy(&["devices/${client_id}/#"], &["devices/${client_id}/#"])
        );
        assert_eq!(
            config.policies["anonymous"],
            policy(&["#"], &["#", "$sluice/#"])
        );

        let acl = Acl::new(&config).unwrap();
        assert!(acl.has_policy("device"));
        assert!(acl.has_policy("anonymous"));
        assert!(!acl.has_policy("dashboard"));
        assert_eq!(acl.device_policy(), "device");
        assert_eq!(acl.anonymous_policy(), "anonymous");

        let d1 = acl.bind("device", "d1", "").unwrap();
        assert_eq!(d1.publish_filters(), ["devices/d1/#"]);
        assert!(d1.may_publish("devices/d1/telemetry"));
        assert!(d1.may_publish("devices/d1"));
        assert!(!d1.may_publish("devices/d2/telemetry"));
        assert!(!d1.may_publish("devices/d10/telemetry"));
        assert!(!d1.may_publish("devices"));
        assert!(!d1.may_publish("$sluice/presence/d1"));
        assert!(!d1.may_publish("devices/d1/+"));
        assert!(d1.may_subscribe("devices/d1/commands"));
        assert!(d1.may_subscribe("devices/d1/#"));
        assert!(!d1.may_subscribe("devices/+/commands"));
        assert!(!d1.may_subscribe("#"));
        assert!(!d1.may_subscribe("devices/d1/#/x"));

        let anon = acl.bind("anonymous", "", "").unwrap();
        assert!(anon.may_publish("anything/at/all"));
        assert!(!anon.may_publish("$sluice/presence/d1"));
        assert!(anon.may_subscribe("#"));
        assert!(anon.may_subscribe("devices/+/telemetry"));
        assert!(anon.may_subscribe("$sluice/presence/+"));
        assert!(!anon.may_subscribe("$SYS/#"));
    }

    #[test]
    fn substitution() {
        let acl = acl_with(&[(
            "both",
            policy(
                &["users/${username}/devices/${client_id}/#"],
                &["users/${username}/+/status", "c-${client_id}-${username}"],
            ),
        )])
        .unwrap();
        let c = acl.bind("both", "d1", "alice").unwrap();
        assert_eq!(c.publish_filters(), ["users/alice/devices/d1/#"]);
        assert_eq!(
            c.subscribe_filters(),
            ["users/alice/+/status", "c-d1-alice"]
        );
        assert!(c.may_publish("users/alice/devices/d1/x"));
        assert!(!c.may_publish("users/bob/devices/d1/x"));
        assert!(c.may_subscribe("users/alice/d9/status"));
        assert!(c.may_subscribe("c-d1-alice"));
        assert!(!c.may_subscribe("c-d1-bob"));

        // `$` in a value is a plain character.
        let c = acl.bind("device", "$d", "").unwrap();
        assert!(c.may_publish("devices/$d/x"));
    }

    #[test]
    fn unsafe_values_deny_everything() {
        let acl = Acl::new(&AclConfig::default()).unwrap();
        for client_id in ["", "+", "#", "/", "a/b", "d+", "d#", "../d2", "d\0"] {
            assert!(
                acl.bind("device", client_id, "user").is_none(),
                "client id {client_id:?} must deny all"
            );
        }
        let acl = acl_with(&[("by-user", policy(&["users/${username}/#"], &[]))]).unwrap();
        for username in ["", "+", "#", "a/b", "u\0"] {
            assert!(
                acl.bind("by-user", "d1", username).is_none(),
                "username {username:?} must deny all"
            );
        }
        // Values a policy doesn't use are not checked.
        assert!(acl.bind("by-user", "", "alice").is_some());
        assert!(acl.bind("device", "d1", "").is_some());
        assert!(acl.bind("anonymous", "#", "+").is_some());
        // Unknown policies deny everything too.
        assert!(acl.bind("nope", "d1", "alice").is_none());
    }

    #[test]
    fn deny_all() {
        let c = ClientAcl::deny_all();
        assert!(!c.may_publish("a"));
        assert!(!c.may_subscribe("#"));
        let acl = acl_with(&[("empty", Policy::default())]).unwrap();
        assert_eq!(acl.bind("empty", "d1", "u").unwrap(), ClientAcl::deny_all());
    }

    #[test]
    fn toml_adds_policy_and_keeps_defaults() {
        let config: AclConfig = toml::from_str(
            r#"
            [policies.dashboard]
            subscribe = ["devices/+/telemetry"]
            publish = ["devices/+/commands"]
            "#,
        )
        .unwrap();
        assert_eq!(config.policies.len(), 3);
        assert_eq!(
            config.policies["dashboard"],
            policy(&["devices/+/commands"], &["devices/+/telemetry"])
        );
        assert_eq!(
            config.policies["device"],
            AclConfig::default().policies["device"]
        );
        assert_eq!(
            config.policies["anonymous"],
            AclConfig::default().policies["anonymous"]
        );
        assert_eq!(config.device_policy, "device");
        assert_eq!(config.anonymous_policy, "anonymous");

        let acl = Acl::new(&config).unwrap();
        let dash = acl.bind("dashboard", "dash-1", "ops").unwrap();
        assert!(dash.may_subscribe("devices/+/telemetry"));
        assert!(dash.may_subscribe("devices/d3/telemetry"));
        assert!(!dash.may_subscribe("devices/#"));
        assert!(dash.may_publish("devices/d3/commands"));
        assert!(!dash.may_publish("devices/d3/telemetry"));
        assert!(
            acl.bind("device", "d3", "")
                .unwrap()
                .may_publish("devices/d3/t")
        );
    }

    #[test]
    fn toml_overrides_a_default_policy() {
        let config: AclConfig = toml::from_str(
            r#"
            device_policy = "strict"
            anonymous_policy = "device"

            [policies.device]
            publish = ["devices/${client_id}/telemetry"]

            [policies.strict]
            publish = ["in/${client_id}"]
            subscribe = ["out/${client_id}"]
            "#,
        )
        .unwrap();
        assert_eq!(
            config.policies["device"],
            policy(&["devices/${client_id}/telemetry"], &[])
        );
        assert!(config.policies.contains_key("anonymous"));
        let acl = Acl::new(&config).unwrap();
        assert_eq!(acl.device_policy(), "strict");
        assert_eq!(acl.anonymous_policy(), "device");

        // Empty and round-tripped configs.
        let empty: AclConfig = toml::from_str("").unwrap();
        assert_eq!(empty, AclConfig::default());
        let round: AclConfig = toml::from_str(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(round, config);

        // Unknown fields are rejected.
        assert!(toml::from_str::<AclConfig>("policy = \"x\"").is_err());
        assert!(toml::from_str::<AclConfig>("[policies.x]\npublsh = [\"a\"]").is_err());
    }

    #[test]
    fn new_rejects_invalid_filters() {
        let err = acl_with(&[("bad", policy(&["a/#/b"], &[]))]).unwrap_err();
        assert_eq!(
            err,
            AclError::InvalidFilter {
                policy: "bad".into(),
                list: FilterList::Publish,
                filter: "a/#/b".into(),
                reason: "'#' must be the whole last level",
            }
        );
        assert_eq!(
            err.to_string(),
            "acl: policy \"bad\", publish filter \"a/#/b\" is invalid: '#' must be the whole last level"
        );

        for (filter, reason) in [
            ("", "filter is empty"),
            ("a/b#", "'#' must be the whole last level"),
            ("a/+b", "'+' must be a whole level"),
            ("a/${client_id}+", "'+' must be a whole level"),
            ("+${username}", "'+' must be a whole level"),
            ("a\0", "filter contains a NUL character"),
        ] {
            match acl_with(&[("bad", policy(&[], &[filter]))]).unwrap_err() {
                AclError::InvalidFilter {
                    list: FilterList::Subscribe,
                    reason: r,
                    ..
                } => assert_eq!(r, reason, "filter {filter:?}"),
                other => panic!("filter {filter:?}: unexpected {other:?}"),
            }
        }
        assert!(matches!(
            acl_with(&[("bad", policy(&["a/${client_id"], &[]))]).unwrap_err(),
            AclError::InvalidFilter { .. }
        ));
    }

    #[test]
    fn new_rejects_unknown_variables() {
        let err = acl_with(&[("vars", policy(&[], &["devices/${foo}/#"]))]).unwrap_err();
        assert_eq!(
            err,
            AclError::UnknownVariable {
                policy: "vars".into(),
                list: FilterList::Subscribe,
                filter: "devices/${foo}/#".into(),
                variable: "foo".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            "acl: policy \"vars\", subscribe filter \"devices/${foo}/#\" uses unknown variable \
             \"${foo}\" (known: ${client_id}, ${username})"
        );
        assert!(matches!(
            acl_with(&[("vars", policy(&["${}"], &[]))]).unwrap_err(),
            AclError::UnknownVariable { variable, .. } if variable.is_empty()
        ));
        // A `$` not followed by `{` is an ordinary character.
        assert!(acl_with(&[("ok", policy(&["$x/$/a$b"], &["$sluice/#"]))]).is_ok());
    }

    #[test]
    fn new_rejects_unknown_policy_names() {
        let config = AclConfig {
            device_policy: "missing".into(),
            ..AclConfig::default()
        };
        let err = Acl::new(&config).unwrap_err();
        assert_eq!(
            err,
            AclError::UnknownPolicy {
                setting: "device_policy",
                name: "missing".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            "acl: device_policy = \"missing\" names a policy that is not defined"
        );

        let config = AclConfig {
            anonymous_policy: "gone".into(),
            ..AclConfig::default()
        };
        assert!(matches!(
            Acl::new(&config).unwrap_err(),
            AclError::UnknownPolicy {
                setting: "anonymous_policy",
                ..
            }
        ));
    }
}
