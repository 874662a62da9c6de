// HubDriver: runs the hub on its own event loop and carries its answers out.
//
// Everything that touches the hub is a task on `hubLoop`, so the hub needs no
// lock. A published batch costs one hop to the hub and then one hop to each
// event loop that has subscribers for it, never one per subscriber. Replies
// to subscriptions travel the same way as fan-out (hub loop, then the
// subscriber's loop, both FIFO), which is what keeps replay and live events
// from overlapping.
//
// Backpressure: `publish` calls `done` only after every loop has written the
// batch, and the ingest reads no more from a connection while it has too many
// batches in flight. So no queue between an emitter socket and a subscriber
// socket grows without bound.

import Logging
import NIOCore
import RelayHub
import Synchronization

final class HubDriver: Sendable {
    let hubLoop: any EventLoop
    let loops: [any EventLoop]
    private let hub: NIOLoopBound<Hub>
    private let registries: [NIOLoopBound<LoopSubscribers>]
    private let outlet: SubscriberLoops
    private let metrics: RelayMetrics
    /// Cluster mode: Redis numbers the events, and this decides what the hub is told.
    let cluster: NIOLoopBound<ClusterCoordinator>?

    private init(
        hubLoop: any EventLoop, loops: [any EventLoop], hub: NIOLoopBound<Hub>,
        registries: [NIOLoopBound<LoopSubscribers>], metrics: RelayMetrics, cluster: NIOLoopBound<ClusterCoordinator>?
    ) {
        self.hubLoop = hubLoop
        self.loops = loops
        self.hub = hub
        self.registries = registries
        self.outlet = SubscriberLoops(loops: loops, registries: registries, metrics: metrics)
        self.metrics = metrics
        self.cluster = cluster
    }

    /// Builds the hub on `hubLoop` and one subscriber registry on each of `loops`.
    /// - Parameter cluster: cluster mode's settings; `configuration.sequencing` must then be `.external`.
    static func make(
        hubLoop: any EventLoop, loops: [any EventLoop], configuration: HubConfiguration, epochPrefix: String,
        restoring states: [TopicState], metrics: RelayMetrics, pingInterval: TimeAmount,
        cluster: ClusterSetup? = nil
    ) async throws -> HubDriver {
        let hub = try await hubLoop.submit {
            let hub = Hub(configuration: configuration, epochPrefix: epochPrefix)
            hub.restore(states, now: Monotonic.now)
            return NIOLoopBound(hub, eventLoop: hubLoop)
        }.get()
        var registries = [NIOLoopBound<LoopSubscribers>]()
        for (index, loop) in loops.enumerated() {
            registries.append(
                try await loop.submit {
                    NIOLoopBound(
                        LoopSubscribers(loopIndex: index, eventLoop: loop, pingInterval: pingInterval),
                        eventLoop: loop)
                }.get())
        }
        var coordinator: NIOLoopBound<ClusterCoordinator>?
        if let cluster {
            let outlet = SubscriberLoops(loops: loops, registries: registries, metrics: metrics)
            coordinator = try await hubLoop.submit {
                NIOLoopBound(ClusterCoordinator.make(hub: hub.value, loop: hubLoop, outlet: outlet, setup: cluster), eventLoop: hubLoop)
            }.get()
        }
        return HubDriver(
            hubLoop: hubLoop, loops: loops, hub: hub, registries: registries, metrics: metrics, cluster: coordinator)
    }

    /// The registry of the loop the caller runs on.
    func registry(on loopIndex: Int) -> LoopSubscribers { registries[loopIndex].value }

    func loopIndex(of loop: any EventLoop) -> Int {
        loops.firstIndex { $0 === loop } ?? 0
    }

    // MARK: Events

    /// Publishes one batch; `done` runs (on any thread) once every subscriber loop has written it.
    ///
    /// In cluster mode the batch goes to Redis instead, and `done` runs once it is queued there;
    /// its events reach subscribers, here and on every other relay, from Redis. Call on the hub's
    /// loop then (emitter connections live there), so that lines are queued in the order read.
    ///
    /// - Returns: in cluster mode, when Redis's queue is full, a future to stop reading emitters
    ///   until; nil otherwise.
    @discardableResult
    func publish(
        _ events: [IncomingEvent], readAt: NIODeadline, done: @escaping @Sendable () -> Void
    ) -> EventLoopFuture<Void>? {
        if let cluster {
            let pause = cluster.value.enqueue(events)
            done()
            return pause
        }
        hubLoop.execute { [hub, outlet, metrics] in
            let plan = hub.value.publish(events, now: Monotonic.now)
            outlet.deliver(plan) {
                metrics.deliveryDelay(nanoseconds: (NIODeadline.now() - readAt).nanoseconds)
                done()
            }
        }
        return nil
    }

    // MARK: Subscriptions

    /// Subscribes; the answer reaches the subscriber through its loop's registry, in order with fan-out.
    func subscribe(_ id: SubscriberID, to name: String, resume: ResumePoint?) {
        if let cluster {
            hubLoop.execute { cluster.value.subscribe(id, to: name, resume: resume) }
            return
        }
        hubLoop.execute { [hub, outlet] in
            let subscription = hub.value.subscribe(id, to: name, resume: resume, now: Monotonic.now)
            outlet.subscribed(id, to: name, subscription)
        }
    }

    /// Ends subscriptions of a connection that went away; nothing is answered.
    func unsubscribe(_ id: SubscriberID, from names: [String]) {
        guard !names.isEmpty else { return }
        if let cluster {
            hubLoop.execute { cluster.value.unsubscribe(id, fromAll: names) }
            return
        }
        hubLoop.execute { [hub] in
            hub.value.unsubscribe(id, fromAll: names, now: Monotonic.now)
        }
    }

    /// Ends one subscription and answers through the same path as fan-out, so that no
    /// event of the topic reaches the subscriber after its `unsubscribed` frame.
    func unsubscribe(_ id: SubscriberID, from name: String, reason: String?) {
        if let cluster {
            hubLoop.execute { cluster.value.unsubscribe(id, from: name, reason: reason) }
            return
        }
        hubLoop.execute { [hub, outlet] in
            hub.value.unsubscribe(id, from: name, now: Monotonic.now)
            outlet.unsubscribed(id, from: name, reason: reason)
        }
    }

    // MARK: Upkeep

    /// Whether the relay can publish, and if not why (`/readyz`): always in single-relay mode.
    func readiness() -> EventLoopFuture<(ready: Bool, reason: String)> {
        guard let cluster else { return hubLoop.makeSucceededFuture((true, "ready")) }
        return hubLoop.submit { cluster.value.readiness }
    }

    /// Cluster mode: hands every queued line to Redis before `deadline`, then closes the Redis
    /// connections. Returns the lines that did not reach Redis (0 in single-relay mode).
    func stopCluster(deadline: NIODeadline) -> EventLoopFuture<Int> {
        guard let cluster else { return hubLoop.makeSucceededFuture(0) }
        return hubLoop.flatSubmit { cluster.value.stop(deadline: deadline) }
    }

    /// Forgets idle topics and refreshes the counts, once a second.
    func startUpkeep(logger: Logger) -> RepeatedTask {
        let history = HistoryReport(logger: logger)
        return hubLoop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { [hub, metrics] _ in
            hub.value.expire(now: Monotonic.now)
            metrics.hubCounts(hub.value.counts)
            history.update(hub.value, metrics: metrics, now: Monotonic.now)
        }
    }

    func refreshCounts() -> EventLoopFuture<Void> {
        hubLoop.submit { [hub, metrics] in metrics.hubCounts(hub.value.counts) }
    }

    /// Runs after every task already queued on the hub and on each loop.
    func barrier() -> EventLoopFuture<Void> {
        hubLoop.flatSubmit { [loops, hubLoop] in
            EventLoopFuture.andAllSucceed(loops.map { $0.submit {} }, on: hubLoop)
        }
    }

    /// Runs `body` with the hub on its loop: how the long-poll registry (LongPollWaiters.swift) gets it.
    func withHub<T: Sendable>(_ body: @escaping @Sendable (Hub) -> T) -> EventLoopFuture<T> {
        hubLoop.submit { [hub] in body(hub.value) }
    }

    func snapshot() -> EventLoopFuture<[TopicState]> {
        hubLoop.submit { [hub] in hub.value.snapshot() }
    }

    /// Closes every subscriber with `code`; completes when all are closed.
    func closeAllSubscribers(_ code: CloseCode) -> EventLoopFuture<Void> {
        let futures = loops.indices.map { index in
            loops[index].flatSubmit { [registries] in
                registries[index].value.stop()
                return registries[index].value.closeAll(code)
            }
        }
        return EventLoopFuture.andAllComplete(futures, on: hubLoop)
    }

    /// Closes the subscribers that did not finish their close handshake in time.
    func closeAllSubscribersNow() -> EventLoopFuture<Void> {
        let futures = loops.indices.map { index in
            loops[index].flatSubmit { [registries] in registries[index].value.closeAllNow() }
        }
        return EventLoopFuture.andAllComplete(futures, on: hubLoop)
    }
}

/// The way from the hub's loop to the subscribers: fan-out plans and answers, each to the
/// loop its subscribers live on, in the order they were made (both hops are FIFO).
struct SubscriberLoops: Sendable {
    let loops: [any EventLoop]
    let registries: [NIOLoopBound<LoopSubscribers>]
    let metrics: RelayMetrics

    /// Writes a plan on every loop it touches; `done` runs once all have written it.
    func deliver(_ plan: FanOut, done: @escaping @Sendable () -> Void = {}) {
        metrics.delivered(plan.deliveryCount)
        let busy = plan.loops.indices.filter { !plan.loops[$0].isEmpty }
        guard !busy.isEmpty else { return done() }
        let countdown = Countdown(busy.count, action: done)
        for index in busy {
            let loopPlan = plan.loops[index]
            loops[index].execute { [registries] in
                registries[index].value.deliver(loopPlan) { countdown.tick() }
            }
        }
    }

    func subscribed(_ id: SubscriberID, to name: String, _ subscription: Subscription) {
        loops[id.loop].execute { [registries] in
            registries[id.loop].value.subscribed(id, to: name, subscription)
        }
    }

    func unsubscribed(_ id: SubscriberID, from name: String, reason: String?) {
        loops[id.loop].execute { [registries] in
            registries[id.loop].value.unsubscribed(id, from: name, reason: reason)
        }
    }
}

/// Carries `--max-history-bytes` evictions to metrics every second and to the log at most once a
/// minute, so that a relay evicting on every batch does not flood its log. Used from the hub's
/// loop only; the mutex (never contended) makes it Sendable for the repeated task.
final class HistoryReport: Sendable {
    private struct State {
        var reported = HistoryEvictions()
        var unlogged = HistoryEvictions()
        var lastWarning: UInt64?
    }

    private let logger: Logger
    private let state = Mutex(State())

    init(logger: Logger) {
        self.logger = logger
    }

    func update(_ hub: Hub, metrics: RelayMetrics, now: UInt64) {
        state.withLock { update(&$0, hub: hub, metrics: metrics, now: now) }
    }

    private func update(_ state: inout State, hub: Hub, metrics: RelayMetrics, now: UInt64) {
        let total = hub.historyEvictions
        let new = HistoryEvictions(events: total.events - state.reported.events, topics: total.topics - state.reported.topics)
        state.reported = total
        metrics.historyStored(bytes: hub.historyBytes, evicted: new)
        state.unlogged.events += new.events
        state.unlogged.topics += new.topics
        guard state.unlogged != HistoryEvictions() else { return }
        if let lastWarning = state.lastWarning, now &- lastWarning < 60_000_000_000 { return }
        logger.warning(
            "stored events were over --max-history-bytes: evicted the oldest history, then idle topics",
            metadata: [
                "history_events": "\(state.unlogged.events)", "topics": "\(state.unlogged.topics)",
                "bytes": "\(hub.historyBytes)", "max_history_bytes": "\(hub.configuration.maxHistoryBytes)",
            ])
        state.lastWarning = now
        state.unlogged = HistoryEvictions()
    }
}

/// Runs an action once the last of `count` parties has ticked.
final class Countdown: Sendable {
    private let remaining: Atomic<Int>
    private let action: @Sendable () -> Void

    init(_ count: Int, action: @escaping @Sendable () -> Void) {
        remaining = Atomic(count)
        self.action = action
    }

    func tick() {
        if remaining.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 { action() }
    }
}

/// Monotonic nanoseconds for the hub's clocks.
enum Monotonic {
    static var now: UInt64 { NIODeadline.now().uptimeNanoseconds }
}
