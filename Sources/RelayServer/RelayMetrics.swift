// RelayMetrics: the relay's counters, read by /stats and exported by /metrics.
//
// Counts live in atomics so that any event loop can bump them without a hop;
// the same increments go to swift-metrics, which the CLI bootstraps with a
// Prometheus registry. No label ever holds a topic, a subject or a token.

import CoreMetrics
import RelayHub
import Synchronization

public final class RelayMetrics: Sendable {
    private let emitters = Atomic<Int>(0)
    private let subscribers = Atomic<Int>(0)
    private let received = Atomic<Int>(0)
    private let rejected = Atomic<Int>(0)
    private let delivered = Atomic<Int>(0)
    private let slowClosed = Atomic<Int>(0)
    private let authFailed = Atomic<Int>(0)
    private let answersDropped = Atomic<Int>(0)
    private let ingestPaused = Atomic<Int>(0)
    private let hubTopics = Atomic<Int>(0)
    private let hubSubscriptions = Atomic<Int>(0)
    private let keys = Atomic<Int>(0)
    private let httpConnections = Atomic<Int>(0)

    private let emitterGauge = Gauge(label: "progress_relay_connections", dimensions: [("kind", "emitter")])
    private let subscriberGauge = Gauge(label: "progress_relay_connections", dimensions: [("kind", "subscriber")])
    private let topicsGauge = Gauge(label: "progress_relay_topics")
    private let subscriptionsGauge = Gauge(label: "progress_relay_subscriptions")
    /// Every HTTP/WebSocket connection held, upgraded or not (`--max-connections` bounds it).
    private let httpGauge = Gauge(label: "progress_relay_http_connections")
    private let httpRefusedCounters: [String: Counter]
    private let receivedCounter = Counter(label: "progress_relay_events_received_total")
    private let rejectedCounters: [String: Counter]
    private let deliveriesCounter = Counter(label: "progress_relay_deliveries_total")
    private let slowCounter = Counter(label: "progress_relay_slow_subscriber_closes_total")
    private let authCounters: [String: Counter]
    private let answersDroppedCounter = Counter(label: "progress_relay_ingest_answers_dropped_total")
    private let pausedCounter = Counter(label: "progress_relay_ingest_paused_total")
    private let delayTimer = Timer(label: "progress_relay_delivery_delay_seconds")
    private let historyBytesGauge = Gauge(label: "progress_relay_history_bytes")
    /// `GET /topics/{topic}` (`topic`) and `GET /topics/{topic}/events` (`topic_events`), answered or refused.
    private let topicRequestCounters = [
        "topic": Counter(label: "progress_relay_http_requests_total", dimensions: [("route", "topic")]),
        "topic_events": Counter(label: "progress_relay_http_requests_total", dimensions: [("route", "topic_events")]),
    ]
    private let longPollGauge = Gauge(label: "progress_relay_longpoll_waiters")
    private let longPolls = Atomic<Int>(0)
    private let historyEvictedCounter = Counter(
        label: "progress_relay_history_evictions_total", dimensions: [("reason", "history")])
    private let topicsEvictedCounter = Counter(label: "progress_relay_history_evictions_total", dimensions: [("reason", "topic")])

    public init() {
        let reasons: [IngestLineError] = [
            .invalidUTF8, .invalidJSON, .notObject, .missingTopic, .invalidTopic, .invalidType,
            .duplicateField, .reservedField, .tooLong, .forbiddenTopic,
        ]
        rejectedCounters = Dictionary(
            uniqueKeysWithValues: reasons.map {
                ($0.rawValue, Counter(label: "progress_relay_events_rejected_total", dimensions: [("reason", $0.rawValue)]))
            })
        let authReasons = ["missing", "malformed", "algorithm", "signature", "expired", "not_yet_valid", "no_subject", "forbidden", "ticket",
            "too_large", "header", "kid", "audience", "issuer", "no_expiry"]
        httpRefusedCounters = Dictionary(
            uniqueKeysWithValues: [
                "max_connections", "max_connections_per_ip", "timeout", "uri_too_long", "headers_too_large", "bad_request",
            ].map { ($0, Counter(label: "progress_relay_http_refused_total", dimensions: [("reason", $0)])) })
        authCounters = Dictionary(
            uniqueKeysWithValues: authReasons.map {
                ($0, Counter(label: "progress_relay_auth_failure_closes_total", dimensions: [("reason", $0)]))
            })
    }

    func emitterConnected(_ delta: Int) {
        let now = emitters.add(delta, ordering: .relaxed).newValue
        emitterGauge.record(now)
    }

    func subscriberConnected(_ delta: Int) {
        let now = subscribers.add(delta, ordering: .relaxed).newValue
        subscriberGauge.record(now)
    }

    /// An SSE stream (`GET /sse`): counted as a subscriber, like a WebSocket, and apart in
    /// `progress_relay_sse_connections` (`/stats` "sse_connections"), which is a subset.
    func eventStreamConnected(_ delta: Int) {
        subscriberConnected(delta)
        sseGauge.record(sseStreams.add(delta, ordering: .relaxed).newValue)
    }
    private let sseStreams = Atomic<Int>(0)
    private let sseGauge = Gauge(label: "progress_relay_sse_connections")

    /// Returns the count after the change: what `--max-connections` is checked against.
    func httpConnected(_ delta: Int) -> Int {
        let now = httpConnections.add(delta, ordering: .relaxed).newValue
        httpGauge.record(now)
        return now
    }

    /// A connection the HTTP edge answered with 503, 408, 414, 431 or 400 and closed.
    func httpRefused(_ reason: String) {
        httpRefusedCounters[reason]?.increment()
    }

    func eventsReceived(_ count: Int) {
        received.add(count, ordering: .relaxed)
        receivedCounter.increment(by: count)
    }

    func eventRejected(_ reason: IngestLineError) {
        rejected.add(1, ordering: .relaxed)
        rejectedCounters[reason.rawValue]?.increment()
    }

    func answerDropped() {
        answersDropped.add(1, ordering: .relaxed)
        answersDroppedCounter.increment()
    }

    /// An emitter connection stopped reading because `--max-inflight-bytes` were in flight.
    func ingestPausedForBudget() {
        ingestPaused.add(1, ordering: .relaxed)
        pausedCounter.increment()
    }

    func delivered(_ count: Int) {
        guard count > 0 else { return }
        delivered.add(count, ordering: .relaxed)
        deliveriesCounter.increment(by: count)
    }

    func slowSubscriberClosed() {
        slowClosed.add(1, ordering: .relaxed)
        slowCounter.increment()
    }

    func authFailureClosed(reason: String) {
        authFailed.add(1, ordering: .relaxed)
        authCounters[reason]?.increment()
    }

    func deliveryDelay(nanoseconds: Int64) {
        delayTimer.recordNanoseconds(nanoseconds)
    }

    func hubCounts(_ counts: HubCounts) {
        hubTopics.store(counts.topics, ordering: .relaxed)
        hubSubscriptions.store(counts.subscriptions, ordering: .relaxed)
        topicsGauge.record(counts.topics)
        subscriptionsGauge.record(counts.subscriptions)
    }

    /// A request to one of the `/topics` routes (TopicRoutes.swift).
    func topicRequest(route: String) {
        topicRequestCounters[route]?.increment()
    }

    /// Long-polls waiting now (LongPollWaiters.swift).
    func longPollWaiters(_ count: Int) {
        longPolls.store(count, ordering: .relaxed)
        longPollGauge.record(count)
    }

    /// `--max-history-bytes`: the bytes now counted, and the evictions since the last report.
    func historyStored(bytes: Int, evicted: HistoryEvictions) {
        historyBytesGauge.record(bytes)
        if evicted.events > 0 { historyEvictedCounter.increment(by: evicted.events) }
        if evicted.topics > 0 { topicsEvictedCounter.increment(by: evicted.topics) }
    }

    /// The JSON body of `/stats`: counts only.
    public var statsJSON: String {
        let fields: [(String, Int)] = [
            ("emitter_connections", emitters.load(ordering: .relaxed)),
            ("subscriber_connections", subscribers.load(ordering: .relaxed)),
            ("http_connections", httpConnections.load(ordering: .relaxed)),
            ("sse_connections", sseStreams.load(ordering: .relaxed)),
            ("topics", hubTopics.load(ordering: .relaxed)),
            ("subscriptions", hubSubscriptions.load(ordering: .relaxed)),
            ("events_received", received.load(ordering: .relaxed)),
            ("events_rejected", rejected.load(ordering: .relaxed)),
            ("deliveries", delivered.load(ordering: .relaxed)),
            ("slow_subscriber_closes", slowClosed.load(ordering: .relaxed)),
            ("auth_failure_closes", authFailed.load(ordering: .relaxed)),
            ("ingest_answers_dropped", answersDropped.load(ordering: .relaxed)),
            ("ingest_paused", ingestPaused.load(ordering: .relaxed)),
            ("keys", keys.load(ordering: .relaxed)),
            ("longpoll_waiters", longPolls.load(ordering: .relaxed)),
        ]
        return "{" + fields.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",") + "}"
    }

    /// How many token keys the relay holds (`/stats` "keys"), set at start and on every reload.
    public func setKeyCount(_ count: Int) {
        keys.store(count, ordering: .relaxed)
    }

    var subscriberCount: Int { subscribers.load(ordering: .relaxed) }
    var emitterCount: Int { emitters.load(ordering: .relaxed) }
}
