// ClusterMetrics: what cluster mode (`--redis`) adds to /metrics.
//
// Made only when cluster mode is on, so that a single relay exports none of
// these series. Every recorder is safe from any thread.

import CoreMetrics

final class ClusterMetrics: Sendable {
    private let up = Gauge(label: "progress_relay_redis_up")
    private let queueBytes = Gauge(label: "progress_relay_redis_queue_bytes")
    private let roundTrip = Timer(label: "progress_relay_redis_rtt_seconds")
    private let reconnects = Counter(label: "progress_relay_redis_reconnects_total")
    private let resent = Counter(label: "progress_relay_redis_resent_total")
    private let skipped = Counter(label: "progress_relay_redis_skipped_lines_total")
    private let gapsRepaired = Counter(label: "progress_relay_gaps_repaired_total")
    private let resets: [String: Counter]
    private let badMessages = Counter(label: "progress_relay_redis_bad_messages_total")

    /// Why a live topic was reset (`progress_relay_topic_resets_total{reason}`).
    enum ResetReason: String, CaseIterable {
        /// Redis numbers the topic in another epoch: it restarted, failed over, or lost the topic.
        case epoch
        /// The same epoch, but history no longer reaches back to the first missing event.
        case history
    }

    init() {
        resets = Dictionary(
            uniqueKeysWithValues: ResetReason.allCases.map {
                ($0.rawValue, Counter(label: "progress_relay_topic_resets_total", dimensions: [("reason", $0.rawValue)]))
            })
        up.record(0)
        queueBytes.record(0)
    }

    func redisUp(_ value: Bool) { up.record(value ? 1 : 0) }
    func queued(bytes: Int) { queueBytes.record(bytes) }
    func roundTrip(nanoseconds: Int64) { roundTrip.recordNanoseconds(nanoseconds) }
    func reconnected() { reconnects.increment() }
    func resent(_ lines: Int) { resent.increment(by: lines) }
    func skippedLine() { skipped.increment() }
    func gapRepaired() { gapsRepaired.increment() }
    func topicReset(_ reason: ResetReason) { resets[reason.rawValue]?.increment() }
    func badMessage() { badMessages.increment() }
}
