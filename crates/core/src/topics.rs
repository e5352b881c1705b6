//! Names on the wire. They use the domain word `rpm` so that any tool that
//! meets them reads them the same way.

/// Kafka topic carrying validated reading batches, keyed by patient id.
pub const READINGS: &str = "rpm.readings.v1";
/// Kafka topic carrying alert lifecycle events, keyed by patient id.
pub const ALERTS: &str = "rpm.alerts.v1";
/// Kafka topic carrying rejected input with its reason, keyed by device id.
pub const DEADLETTER: &str = "rpm.deadletter.v1";

/// MQTT topic filter ingest subscribes to (inside a shared subscription):
/// `rpm/v1/devices/{device_id}/readings` and `.../readings/json`.
pub const MQTT_READINGS_FILTER: &str = "rpm/v1/devices/+/readings/#";

/// The topic a device publishes its readings to.
pub fn mqtt_readings_topic(device_id: &str) -> String {
    format!("rpm/v1/devices/{device_id}/readings")
}

/// The device id and payload-format hint encoded in a readings topic, or
/// `None` when the topic is not a readings topic.
///
/// `rpm/v1/devices/bp-1/readings` gives `("bp-1", false)`,
/// `rpm/v1/devices/bp-1/readings/json` gives `("bp-1", true)`.
pub fn parse_readings_topic(topic: &str) -> Option<(&str, bool)> {
    let rest = topic.strip_prefix("rpm/v1/devices/")?;
    let (device, tail) = rest.split_once('/')?;
    if device.is_empty() {
        return None;
    }
    match tail {
        "readings" => Some((device, false)),
        "readings/json" => Some((device, true)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_topics_parse() {
        assert_eq!(parse_readings_topic("rpm/v1/devices/bp-1/readings"), Some(("bp-1", false)));
        assert_eq!(parse_readings_topic("rpm/v1/devices/bp-1/readings/json"), Some(("bp-1", true)));
        assert_eq!(parse_readings_topic(&mqtt_readings_topic("ox-9")), Some(("ox-9", false)));
        assert_eq!(parse_readings_topic("rpm/v1/devices//readings"), None);
        assert_eq!(parse_readings_topic("rpm/v1/devices/bp-1/status"), None);
        assert_eq!(parse_readings_topic("rpm/v1/devices/bp-1/readings/xml"), None);
        assert_eq!(parse_readings_topic("other/bp-1/readings"), None);
    }
}
