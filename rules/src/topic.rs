//! MQTT topic filters (`+` one level, `#` the rest) and the device-topic convention.

use std::fmt;

/// A validated MQTT topic filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    filter: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("a topic filter cannot be empty")]
    Empty,
    #[error("`#` must be the last level of a topic filter and stand alone in it")]
    MisplacedHash,
    #[error("`+` must stand alone in its topic level")]
    MisplacedPlus,
    #[error("a topic filter cannot contain U+0000")]
    Nul,
}

impl TopicFilter {
    pub fn new(filter: &str) -> Result<Self, FilterError> {
        if filter.is_empty() {
            return Err(FilterError::Empty);
        }
        if filter.contains('\0') {
            return Err(FilterError::Nul);
        }
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
                return Err(FilterError::MisplacedHash);
            }
            if level.contains('+') && *level != "+" {
                return Err(FilterError::MisplacedPlus);
            }
        }
        Ok(Self {
            filter: filter.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.filter
    }

    /// MQTT 3.1.1 §4.7: wildcards in the first level do not match topics
    /// starting with `$` (those are the server's own).
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && self.filter.starts_with(['+', '#']) {
            return false;
        }
        let mut topic_levels = topic.split('/');
        for level in self.filter.split('/') {
            match level {
                "#" => return true,
                "+" => {
                    if topic_levels.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if topic_levels.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        topic_levels.next().is_none()
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.filter)
    }
}

/// The device id of a topic that follows the `devices/{device_id}/…` convention.
pub fn device_id_from_topic(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("devices/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filter: &str, topic: &str) -> bool {
        TopicFilter::new(filter).unwrap().matches(topic)
    }

    #[test]
    fn wildcards_match_as_the_spec_says() {
        assert!(m("devices/+/telemetry", "devices/d1/telemetry"));
        assert!(!m("devices/+/telemetry", "devices/d1/x/telemetry"));
        assert!(!m("devices/+/telemetry", "devices/d1"));
        assert!(m("devices/#", "devices"));
        assert!(m("devices/#", "devices/d1/a/b"));
        assert!(m("#", "a/b"));
        assert!(!m("#", "$SYS/x"));
        assert!(!m("+/x", "$SYS/x"));
        assert!(m("$SYS/#", "$SYS/x"));
        assert!(m("a/+", "a/"));
        assert!(!m("a/b", "a/b/c"));
        assert!(!m("a/b/c", "a/b"));
    }

    #[test]
    fn invalid_filters_are_refused() {
        assert_eq!(TopicFilter::new(""), Err(FilterError::Empty));
        assert_eq!(TopicFilter::new("a/#/b"), Err(FilterError::MisplacedHash));
        assert_eq!(TopicFilter::new("a/b#"), Err(FilterError::MisplacedHash));
        assert_eq!(TopicFilter::new("a/b+"), Err(FilterError::MisplacedPlus));
    }

    #[test]
    fn device_ids_come_from_the_second_level() {
        assert_eq!(
            device_id_from_topic("devices/dev-1/telemetry"),
            Some("dev-1")
        );
        assert_eq!(device_id_from_topic("devices/dev-1"), Some("dev-1"));
        assert_eq!(device_id_from_topic("devices//telemetry"), None);
        assert_eq!(device_id_from_topic("other/dev-1/telemetry"), None);
    }
}
