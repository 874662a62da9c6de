// LoopSubscribers: the subscriber connections that live on one event loop.
//
// Fan-out arrives here once per batch per loop and is written to each
// connection with no further hop. Which connections were written to and
// wait for the batch's flush is kept here, not in the connections: they
// are told `deliver` and `flushDelivered`, and nothing of theirs is set
// from outside. One timer per loop walks its connections for token expiry
// and heartbeats, instead of a timer per connection; both on the monotonic
// clock, so a wall-clock step does not close everyone at once.

import Foundation
import NIOCore
import RelayHub

final class LoopSubscribers {
    let loopIndex: Int
    private let eventLoop: any EventLoop
    private let pingInterval: TimeAmount
    private var connections: [UInt64: Slot<SubscriberSessionHandler>] = [:]
    /// SSE connections (`GET /sse`), keyed by their serial with `SubscriberID.eventStreamBit`.
    private var streams: [UInt64: Slot<SSESubscriberHandler>] = [:]
    private var nextSerial: UInt64 = 0
    private var nextPing: NIODeadline
    private var timer: RepeatedTask?

    init(loopIndex: Int, eventLoop: any EventLoop, pingInterval: TimeAmount) {
        self.loopIndex = loopIndex
        self.eventLoop = eventLoop
        self.pingInterval = pingInterval
        self.nextPing = .now() + pingInterval
    }

    /// A connection, and whether a fan-out batch wrote to it and has not flushed it yet.
    private final class Slot<Connection: AnyObject> {
        let connection: Connection
        var awaitingFlush = false

        init(_ connection: Connection) {
            self.connection = connection
        }
    }

    func register(_ connection: SubscriberSessionHandler) -> SubscriberID {
        nextSerial += 1
        connections[nextSerial] = Slot(connection)
        if timer == nil { startTimer() }
        return SubscriberID(loop: loopIndex, serial: nextSerial)
    }

    /// An SSE connection: its id carries the stream bits, so the hub builds its event forms.
    func register(stream: SSESubscriberHandler, pattern: Bool) -> SubscriberID {
        nextSerial += 1
        let serial = nextSerial | SubscriberID.eventStreamBit | (pattern ? SubscriberID.patternStreamBit : 0)
        streams[serial] = Slot(stream)
        if timer == nil { startTimer() }
        return SubscriberID(loop: loopIndex, serial: serial)
    }

    func remove(_ id: SubscriberID) {
        if id.isEventStream {
            streams[id.serial] = nil
        } else {
            connections[id.serial] = nil
        }
    }

    /// Connections written to since the last flush, and the batches waiting for that flush.
    private var touched: [Slot<SubscriberSessionHandler>] = []
    private var touchedStreams: [Slot<SSESubscriberHandler>] = []
    private var waitingForFlush: [@Sendable () -> Void] = []
    private var flushScheduled = false

    /// Writes a batch's frames now and flushes once per turn of the loop: every batch already
    /// queued on this loop is written before the flush task runs, so a subscriber behind on
    /// several batches (from several emitter connections) gets one system call, not one each.
    /// `done` runs after the flush, which is what holds emitters back when subscribers lag.
    func deliver(_ plan: LoopPlan, done: @escaping @Sendable () -> Void) {
        plan.forEachRun { targets, range in
            switch targets {
            case .one(let id):
                write(plan, range, to: id)
            case .many(let ids):
                for id in ids { write(plan, range, to: id) }
            }
        }
        waitingForFlush.append(done)
        guard !flushScheduled else { return }
        flushScheduled = true
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        eventLoop.execute { bound.value.flushTouched() }
    }

    private func write(_ plan: LoopPlan, _ range: Range<Int>, to id: SubscriberID) {
        if id.isEventStream { return writeStream(plan, range, to: id) }
        let frames = plan.frames
        guard let slot = connections[id.serial] else { return }
        slot.connection.deliver(frames, range)
        if !slot.awaitingFlush {
            slot.awaitingFlush = true
            touched.append(slot)
        }
    }

    /// The SSE forms the hub built for this plan (a frame without one, such as a control frame
    /// meant for WebSocket subscribers only, is skipped).
    private func writeStream(_ plan: LoopPlan, _ range: Range<Int>, to id: SubscriberID) {
        guard let slot = streams[id.serial], !plan.streamFrames.isEmpty else { return }
        slot.connection.deliver(plan.streamFrames, range, for: id)
        if !slot.awaitingFlush {
            slot.awaitingFlush = true
            touchedStreams.append(slot)
        }
    }

    private func flushTouched() {
        flushScheduled = false
        let connections = touched
        touched = []
        for slot in connections {
            slot.awaitingFlush = false
            slot.connection.flushDelivered()
        }
        let streams = touchedStreams
        touchedStreams = []
        for slot in streams {
            slot.awaitingFlush = false
            slot.connection.flushDelivered()
        }
        let waiting = waitingForFlush
        waitingForFlush = []
        for done in waiting { done() }
    }

    func subscribed(_ id: SubscriberID, to topic: String, _ subscription: Subscription) {
        if id.isEventStream { return streams[id.serial]?.connection.subscribed(to: topic, subscription) ?? () }
        connections[id.serial]?.connection.subscribed(to: topic, subscription)
    }

    func unsubscribed(_ id: SubscriberID, from topic: String, reason: String?) {
        if id.isEventStream { return streams[id.serial]?.connection.unsubscribed(from: topic, reason: reason) ?? () }
        connections[id.serial]?.connection.unsubscribed(from: topic, reason: reason)
    }

    /// Closes every connection with `code`; the future completes when they are all closed.
    func closeAll(_ code: CloseCode) -> EventLoopFuture<Void> {
        let closed = connections.values.map(\.connection).map { connection -> EventLoopFuture<Void> in
            connection.close(code)
            return connection.closeFuture ?? eventLoop.makeSucceededVoidFuture()
        } + streams.values.map(\.connection).map { stream -> EventLoopFuture<Void> in
            stream.shutDown()
            return stream.closeFuture ?? eventLoop.makeSucceededVoidFuture()
        }
        return EventLoopFuture.andAllComplete(closed, on: eventLoop)
    }

    /// Closes every connection now, without a close handshake; for the end of shutdown.
    func closeAllNow() -> EventLoopFuture<Void> {
        let closed = connections.values.map(\.connection).compactMap { connection -> EventLoopFuture<Void>? in
            guard let future = connection.closeFuture else { return nil }
            connection.closeNow()
            return future
        } + streams.values.map(\.connection).compactMap { stream -> EventLoopFuture<Void>? in
            guard let future = stream.closeFuture else { return nil }
            stream.closeNow()
            return future
        }
        return EventLoopFuture.andAllComplete(closed, on: eventLoop)
    }

    private func startTimer() {
        let tick = TimeAmount.milliseconds(250)
        let bound = NIOLoopBound(self, eventLoop: eventLoop)
        timer = eventLoop.scheduleRepeatedTask(initialDelay: tick, delay: tick) { _ in
            bound.value.tick()
        }
    }

    private func tick() {
        let now = NIODeadline.now()
        let ping = now >= nextPing
        if ping { nextPing = now + pingInterval }
        let deadAfter = TimeAmount.nanoseconds(pingInterval.nanoseconds * 2)
        for slot in Array(connections.values) {
            slot.connection.tick(now: now, sendPing: ping, deadAfter: deadAfter)
        }
        for slot in Array(streams.values) {
            slot.connection.tick(now: now, sendPing: ping)
        }
    }

    func stop() {
        timer?.cancel()
        timer = nil
    }
}
