//! Read queries behind the gRPC API. Every value is a bound parameter; the
//! only SQL text that varies is picked from fixed strings (a sort
//! direction), never built from input.
//!
//! Every statement here is sent unprepared (`persistent(false)`), so
//! PostgreSQL plans it for the values at hand: a prepared statement soon
//! switches to a generic plan, which cannot prune partitions at plan time
//! and searches an id or name list linearly for every row where a custom
//! plan hashes it (measured: `LatestPoints` for 10,000 series went from
//! about 30 ms to over 100 ms on the generic plan). Planning costs about a
//! millisecond.
//!
//! Paged queries are keyset-based: each orders by a unique key and resumes
//! strictly after the last key of the previous page, so pages stay stable
//! and cheap however deep the caller goes. Streaming queries hand rows over
//! as PostgreSQL sends them, so a slow reader slows the query instead of
//! filling memory.

mod aggregate;
mod catalog;
mod estimate;
mod events;
mod points;

pub use aggregate::{AggregateQuery, BucketAggregate, RollupCoverage, Sources, aggregate_points};
pub use catalog::{SeriesName, devices_with_data, series_with_data};
pub use estimate::{estimate_event_rows, estimate_point_rows};
pub use events::{EventsQuery, StoredEvent, query_events, stream_events};
pub use points::{
    LatestPoint, LatestQuery, PointsQuery, SelectedSeries, SeriesSelection, StoredPoint,
    StreamedPoint, latest_points, query_points, selected_series, stream_points,
};

/// The series-selection condition shared by point queries, over `series s`:
/// `$1` device ids (when not empty), else `$2` a device-id prefix; `$3`
/// metrics (empty: all).
macro_rules! series_selection {
    () => {
        "(cardinality($1::text[]) > 0 AND s.device_id = ANY($1) \
           OR cardinality($1::text[]) = 0 AND starts_with(s.device_id, $2)) \
         AND (cardinality($3::text[]) = 0 OR s.metric = ANY($3))"
    };
}
pub(crate) use series_selection;

/// Translates a valid MQTT topic filter into an anchored POSIX regular
/// expression, so the database can filter stored topics the way the broker
/// routes live ones: `+` is one level, a trailing `#` is the parent level and
/// everything below it.
pub fn topic_filter_regex(filter: &str) -> String {
    let levels: Vec<&str> = filter.split('/').collect();
    let mut re = String::from("^");
    for (i, level) in levels.iter().enumerate() {
        let last = i + 1 == levels.len();
        match *level {
            "#" => {
                // `a/#` matches `a` itself too; a lone `#` matches everything.
                if i == 0 {
                    re.push_str(".*");
                } else {
                    re.truncate(re.len() - 1); // the '/' pushed after the previous level
                    re.push_str("(/.*)?");
                }
                return re + "$";
            }
            "+" => re.push_str("[^/]*"),
            literal => {
                for c in literal.chars() {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' || !c.is_ascii() {
                        re.push(c);
                    } else {
                        re.push('\\');
                        re.push(c);
                    }
                }
            }
        }
        if !last {
            re.push('/');
        }
    }
    re.push('$');
    re
}

#[cfg(test)]
mod tests {
    use super::topic_filter_regex;

    #[test]
    fn filters_become_anchored_regexes() {
        assert_eq!(topic_filter_regex("#"), "^.*$");
        assert_eq!(topic_filter_regex("a/+/c"), "^a/[^/]*/c$");
        assert_eq!(topic_filter_regex("a/#"), "^a(/.*)?$");
        assert_eq!(topic_filter_regex("a.b/c"), "^a\\.b/c$");
    }
}
