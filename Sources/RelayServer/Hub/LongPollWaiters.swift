// LongPollWaiters: the reads behind `GET /topics/{topic}` and the one-shot waiters of
// `GET /topics/{topic}/events?wait=`, kept on the hub's loop next to the hub they read.
//
// A waiter is a promise, not a blocked thread: the hub tells this registry when an awaited topic
// gets an event (`Hub.awaitedEvent`), and the registry answers that topic's waiters once the
// loop's current task is done (so a whole batch is in the answer). A timer answers the rest.
//
// Bounds: a waiter holds its HTTP connection, which `--max-connections` and
// `--max-connections-per-ip` count already; and one token `sub` may hold at most
// `--max-subscriptions` waiters at once, as one WebSocket connection holds at most that many
// subscriptions (a browser tab polling stays far below it; a runaway loop gets 429).
//
// Cluster mode: a topic the hub holds is current (its channel or a pattern feeds it). One it does
// not hold is read from Redis (the read that joins use); a waiter on it reads again every second,
// since no message of that topic reaches this relay. That costs Redis one read a second per such
// waiter, bounded as above.

import Logging
import NIOCore
import RelayCluster
import RelayHub
import Synchronization

/// What a `/topics` route answers with, decided on the hub's loop.
enum TopicAnswer: Sendable {
    case read(TopicReadResult)
    /// `sub` holds `--max-subscriptions` waiters already.
    case tooManyWaiters
    /// Cluster mode: the topic had to be read from Redis, which is not reachable.
    case unavailable(String)
    /// The connection went away first: nothing to write.
    case cancelled
}

/// The Sendable face of the registry, for the HTTP handlers on every loop.
final class LongPoll: Sendable {
    let hubLoop: any EventLoop
    let metrics: RelayMetrics
    private let waiters: NIOLoopBound<LongPollWaiters>
    private let serial = Atomic<UInt64>(0)

    private init(hubLoop: any EventLoop, metrics: RelayMetrics, waiters: NIOLoopBound<LongPollWaiters>) {
        self.hubLoop = hubLoop
        self.metrics = metrics
        self.waiters = waiters
    }

    static func make(driver: HubDriver, maxPerSubject: Int, metrics: RelayMetrics) async throws -> LongPoll {
        let loop = driver.hubLoop
        let waiters = try await driver.withHub { hub in
            NIOLoopBound(
                LongPollWaiters(hub: hub, loop: loop, cluster: driver.cluster, maxPerSubject: maxPerSubject, metrics: metrics),
                eventLoop: loop)
        }.get()
        return LongPoll(hubLoop: loop, metrics: metrics, waiters: waiters)
    }

    /// The newest event (`GET /topics/{topic}`).
    func latest(_ topic: String, on loop: any EventLoop) -> EventLoopFuture<TopicAnswer> {
        let promise = loop.makePromise(of: TopicAnswer.self)
        hubLoop.execute { [waiters] in waiters.value.read(topic, resume: nil, wait: nil, subject: "", id: 0, promise: promise) }
        return promise.futureResult
    }

    /// The events after `resume`, at once or after up to `wait`; `id` names the poll for `cancel`.
    func poll(
        _ topic: String, resume: ResumePoint?, wait: TimeAmount, subject: String, on loop: any EventLoop
    ) -> (id: UInt64, answer: EventLoopFuture<TopicAnswer>) {
        let id = serial.add(1, ordering: .relaxed).newValue
        let promise = loop.makePromise(of: TopicAnswer.self)
        hubLoop.execute { [waiters] in
            waiters.value.read(topic, resume: resume, wait: wait, subject: subject, id: id, promise: promise)
        }
        return (id, promise.futureResult)
    }

    /// The poll's connection closed: its slot is freed now rather than at its timeout.
    func cancel(_ id: UInt64) {
        hubLoop.execute { [waiters] in waiters.value.finish(id, .cancelled) }
    }

    /// Shutdown: answers every waiter now with what the hub holds, and every later poll at once.
    func stop() -> EventLoopFuture<Void> {
        hubLoop.submit { [waiters] in waiters.value.stop() }
    }
}

final class LongPollWaiters {
    private struct Waiter {
        let topic: String
        let resume: ResumePoint?
        let subject: String
        let promise: EventLoopPromise<TopicAnswer>
        var timer: Scheduled<Void>?
        /// Cluster mode, a topic this relay does not hold: read again from Redis every second.
        let viaRedis: Bool
    }

    private let hub: Hub
    private let loop: any EventLoop
    private let cluster: NIOLoopBound<ClusterCoordinator>?
    private let maxPerSubject: Int
    private let metrics: RelayMetrics
    private let allocator = ByteBufferAllocator()
    private var waiters: [UInt64: Waiter] = [:]
    private var byTopic: [String: Set<UInt64>] = [:]
    private var bySubject: [String: Int] = [:]
    private var woken = Set<String>()
    private var redisTimer: RepeatedTask?
    private var stopped = false

    init(hub: Hub, loop: any EventLoop, cluster: NIOLoopBound<ClusterCoordinator>?, maxPerSubject: Int, metrics: RelayMetrics) {
        self.hub = hub
        self.loop = loop
        self.cluster = cluster
        self.maxPerSubject = maxPerSubject
        self.metrics = metrics
        hub.awaitedEvent = { [weak self] topic in self?.woke(topic) }
    }

    /// Answers at once when there is something to answer (or `wait` is nil or zero), else parks a waiter.
    func read(
        _ topic: String, resume: ResumePoint?, wait: TimeAmount?, subject: String, id: UInt64,
        promise: EventLoopPromise<TopicAnswer>
    ) {
        let result = hub.read(topic, resume: resume)
        if case .notHeld = result, cluster != nil {
            return readRedis(topic, resume: resume) { answer in
                if case .read(.upToDate) = answer { return self.park(topic, resume, wait, subject, id, promise, answer, viaRedis: true) }
                if case .read(.notHeld) = answer { return self.park(topic, resume, wait, subject, id, promise, answer, viaRedis: true) }
                promise.succeed(answer)
            }
        }
        switch result {
        case .notHeld, .upToDate: park(topic, resume, wait, subject, id, promise, .read(result), viaRedis: false)
        case .events: promise.succeed(.read(result))
        }
    }

    private func park(
        _ topic: String, _ resume: ResumePoint?, _ wait: TimeAmount?, _ subject: String, _ id: UInt64,
        _ promise: EventLoopPromise<TopicAnswer>, _ now: TopicAnswer, viaRedis: Bool
    ) {
        guard let wait, wait > .zero, !stopped else { return promise.succeed(now) }
        guard bySubject[subject, default: 0] < maxPerSubject else { return promise.succeed(.tooManyWaiters) }
        bySubject[subject, default: 0] += 1
        byTopic[topic, default: []].insert(id)
        hub.awaitedTopics.insert(topic)
        let timer = loop.assumeIsolated().scheduleTask(in: wait) { [self] in
            self.timedOut(id)
        }
        waiters[id] = Waiter(topic: topic, resume: resume, subject: subject, promise: promise, timer: timer, viaRedis: viaRedis)
        metrics.longPollWaiters(waiters.count)
        if viaRedis, redisTimer == nil {
            let bound = NIOLoopBound(self, eventLoop: loop)
            redisTimer = loop.scheduleRepeatedTask(initialDelay: .seconds(1), delay: .seconds(1)) { _ in
                bound.value.rereadRedis()
            }
        }
    }

    /// Removes a waiter and answers it; nothing when it was answered already.
    func finish(_ id: UInt64, _ answer: TopicAnswer) {
        guard let waiter = waiters.removeValue(forKey: id) else { return }
        waiter.timer?.cancel()
        if let left = bySubject[waiter.subject], left > 1 { bySubject[waiter.subject] = left - 1 } else { bySubject[waiter.subject] = nil }
        if var ids = byTopic[waiter.topic] {
            ids.remove(id)
            if ids.isEmpty {
                byTopic[waiter.topic] = nil
                hub.awaitedTopics.remove(waiter.topic)
            } else {
                byTopic[waiter.topic] = ids
            }
        }
        if waiter.viaRedis, !waiters.values.contains(where: \.viaRedis) {
            redisTimer?.cancel()
            redisTimer = nil
        }
        metrics.longPollWaiters(waiters.count)
        waiter.promise.succeed(answer)
    }

    private func timedOut(_ id: UInt64) {
        guard let waiter = waiters[id] else { return }
        waiters[id]?.timer = nil
        finish(id, .read(hub.read(waiter.topic, resume: waiter.resume)))
    }

    /// Called by the hub in the middle of a publish: answered after it, with the whole batch.
    private func woke(_ topic: String) {
        let first = woken.isEmpty
        woken.insert(topic)
        guard first else { return }
        let bound = NIOLoopBound(self, eventLoop: loop)
        loop.execute { bound.value.answerWoken() }
    }

    private func answerWoken() {
        let topics = woken
        woken = []
        for topic in topics {
            for id in byTopic[topic] ?? [] {
                guard let waiter = waiters[id] else { continue }
                let result = hub.read(topic, resume: waiter.resume)
                if case .events = result { finish(id, .read(result)) }
            }
        }
    }

    func stop() {
        stopped = true
        for (id, waiter) in waiters {
            let result = hub.read(waiter.topic, resume: waiter.resume)
            // A topic only Redis holds is answered as the last read of it found it: nothing new.
            if waiter.viaRedis, case .notHeld = result {
                finish(id, .read(.upToDate(TopicPosition(epoch: waiter.resume?.epoch ?? "", seq: waiter.resume?.since ?? 0))))
            } else {
                finish(id, .read(result))
            }
        }
    }

    // MARK: Cluster mode

    private func readRedis(_ topic: String, resume: ResumePoint?, then: @escaping (TopicAnswer) -> Void) {
        guard let sequencer = cluster?.value.publisher.connectedSequencer else {
            return then(.unavailable("Redis is not reachable; this relay does not hold the topic"))
        }
        let count = hub.configuration.historyLimit
        let allocator = self.allocator
        sequencer.read(topic: topic, count: max(1, count)).hop(to: loop).assumeIsolated().whenComplete { result in
            switch result {
            case .success(let history): then(.read(Self.result(of: history, resume: resume, allocator: allocator)))
            case .failure(let error): then(.unavailable("reading the topic from Redis failed: \(error)"))
            }
        }
    }

    private func rereadRedis() {
        for (id, waiter) in waiters where waiter.viaRedis {
            readRedis(waiter.topic, resume: waiter.resume) { answer in
                guard case .read(let result) = answer, case .events = result else { return }
                self.finish(id, answer)
            }
        }
    }

    /// A topic as Redis holds it, by the same rules as the hub's `read`.
    static func result(of history: TopicHistory, resume: ResumePoint?, allocator: ByteBufferAllocator) -> TopicReadResult {
        guard history.seq > 0 else { return .notHeld }
        let position = TopicPosition(epoch: history.epoch, seq: UInt64(history.seq))
        let frames = history.entries.compactMap { entry -> (seq: UInt64, frame: ByteBuffer)? in
            guard entry.seq > 0, let frame = Hub.eventFrame(seq: UInt64(entry.seq), object: entry.line, allocator: allocator)
            else { return nil }
            return (UInt64(entry.seq), frame)
        }
        let newest = frames.last.flatMap { $0.seq == position.seq ? $0.frame : nil }
        return Hub.answer(position: position, resume: resume, newest: newest) { since in
            guard let first = frames.first, since + 1 >= first.seq, frames.last?.seq == position.seq else { return nil }
            return frames.filter { $0.seq > since }.map(\.frame)
        }
    }
}
