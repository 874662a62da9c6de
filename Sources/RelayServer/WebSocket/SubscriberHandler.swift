// SubscriberHandler: one WebSocket subscriber connection.
//
// It owns the connection's whole life after the handshake: the verified
// token (or the error to close with), its subscriptions, reassembly of
// fragmented client messages, the protocol checks NIO's decoder leaves to
// the application, and writing. Events arrive from the hub already framed;
// this handler writes those shared buffers unchanged and flushes once per
// batch. It never makes the hub wait: when it owes more than
// `--max-outbound-bytes` of live events it is closed with 1013.
//
// A hostile client meets the bounds of docs/hardening.md ("WebSocket clients"): fragments
// (FragmentAssembler), close frames (ClientClose), operations per second (OperationRate), one
// pong per read batch, and patterns per connection here and relay-wide in the hub.

import Foundation
import Logging
import NIOCore
import NIOWebSocket
import RelayAuth
import RelayHub

/// What every subscriber connection shares.
struct SubscriberEnvironment: Sendable {
    let driver: HubDriver
    let verifier: TokenVerifier
    let metrics: RelayMetrics
    let maxSubscriptions: Int
    /// Of those, patterns (`--max-pattern-subscriptions`): each one is matched against every
    /// topic that gets an event, so they cost more than exact subscriptions.
    let maxPatternSubscriptions: Int
    let maxOutboundBytes: Int
    let maxMessageBytes: Int
    let logger: Logger
    /// `--ping-interval`, told to the client in its connection's first `subscribed` frame.
    var pingInterval: TimeAmount = .seconds(25)
}

final class SubscriberHandler: ChannelInboundHandler {
    typealias InboundIn = WebSocketFrame
    typealias OutboundOut = ByteBuffer

    private let environment: SubscriberEnvironment
    private var authentication: Result<Principal, TokenError>
    private let urlTopics: [String]

    private var context: ChannelHandlerContext?
    private var registry: LoopSubscribers?
    private(set) var id = SubscriberID(loop: 0, serial: 0)
    private var principal: Principal?
    private var subscriptions = Set<String>()
    private var refreshing = false
    /// Whether a `subscribed` frame has carried `ping_interval` on this connection (the first does).
    private var toldPingInterval = false
    /// When the token's `exp` (plus leeway) passes, on the monotonic clock: a wall-clock step
    /// after the token was checked neither ends sessions early nor keeps them late.
    private var expiresAt: NIODeadline?
    private var lastRefresh: NIODeadline?
    /// At most one `refresh` per this long: each costs a signature check.
    static let refreshInterval = TimeAmount.seconds(10)

    private var assembler: FragmentAssembler
    private var rate = OperationRate()
    /// The payload of the newest ping of this read batch: answered once, in `channelReadComplete`
    /// (RFC 6455 5.5.3 allows answering only the most recent ping), so a ping flood costs one
    /// pong per batch, not one per ping.
    private var pendingPong: ByteBuffer?
    private(set) var lastHeard = NIODeadline.now()
    private(set) var closing = false
    /// Bytes of replay and snapshots still unsent: they do not count against the outbound bound.
    private var replayOutstanding = 0
    /// Set while a fan-out batch has written to this connection and not flushed yet.
    var flushPending = false
    /// The channel's writability, kept from its events: `context.channel.isWritable` on every
    /// flush showed in the fan-out profile (a pipeline walk and a retain per call).
    private var writable = true

    init(environment: SubscriberEnvironment, authentication: Result<Principal, TokenError>, urlTopics: [String]) {
        self.environment = environment
        self.authentication = authentication
        self.urlTopics = urlTopics
        self.assembler = FragmentAssembler(maxMessageBytes: environment.maxMessageBytes)
    }

    // MARK: Life

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        writable = context.channel.isWritable
        let loopIndex = environment.driver.loopIndex(of: context.eventLoop)
        let registry = environment.driver.registry(on: loopIndex)
        self.registry = registry
        id = registry.register(self)
        environment.metrics.subscriberConnected(1)

        switch authentication {
        case .failure(let error):
            environment.metrics.authFailureClosed(reason: error.reason)
            environment.logger.info("subscriber refused", metadata: ["reason": "\(error)", "peer": "\(peer)"])
            send(ControlFrame.error(.unauthorized, error.description))
            close(.unauthorized)
        case .success(let principal):
            self.principal = principal
            expiresAt = Self.deadline(principal)
            environment.logger.debug(
                "subscriber connected", metadata: ["sub": "\(principal.subject)", "peer": "\(peer)", "id": "\(id)"])
            if let refused = urlTopics.first(where: { !principal.grants.covers($0) || !TopicName.isValidTopicOrPattern($0) }) {
                environment.metrics.authFailureClosed(reason: "forbidden")
                send(ControlFrame.error(.forbidden, "topic not granted", topic: refused))
                close(.forbidden)
                return
            }
            for topic in urlTopics { subscribe(topic, resume: nil) }
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        registry?.remove(id)
        environment.driver.unsubscribe(id, from: Array(subscriptions))
        subscriptions.removeAll()
        environment.metrics.subscriberConnected(-1)
        self.context = nil
    }

    var closeFuture: EventLoopFuture<Void>? { context?.channel.closeFuture }

    private var peer: String { context?.channel.remoteAddress?.description ?? "?" }

    // MARK: Reading

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        lastHeard = .now()
        guard !closing else { return }
        // NIO's decoder leaves these RFC 6455 section 5 checks to the application.
        guard frame.maskKey != nil, !frame.rsv1, !frame.rsv2, !frame.rsv3 else {
            return close(.protocolError, reason: frame.maskKey == nil ? "unmasked frame" : "reserved bit set")
        }
        switch frame.opcode {
        case .text:
            assembled(assembler.text(frame))
        case .continuation:
            assembled(assembler.continuation(frame))
        case .binary:
            close(.unsupportedData, reason: "binary messages are not accepted")
        case .connectionClose:
            let answer = ClientClose.answer(to: frame.unmaskedData)
            close(answer.code, reason: answer.reason)
        case .ping:
            guard frame.fin else { return close(.protocolError) }
            guard withinRate() else { return }
            pendingPong = frame.unmaskedData
        case .pong:
            _ = withinRate()
        default:
            close(.protocolError, reason: "reserved opcode")
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if let payload = pendingPong {
            pendingPong = nil
            send(ControlFrame.pong(payload: payload))
        }
        context.fireChannelReadComplete()
    }

    private func assembled(_ outcome: FragmentAssembler.Outcome) {
        switch outcome {
        case .message(let buffer):
            guard withinRate() else { return }
            message(buffer)
        case .pending:
            break
        case .refused(let code, let reason):
            close(code, reason: reason)
        }
    }

    /// Counts one operation; past the rate the connection is closed with 1008 (policy violation).
    private func withinRate() -> Bool {
        guard rate.take() else {
            environment.logger.info("subscriber over its operation rate", metadata: ["id": "\(id)", "peer": "\(peer)"])
            close(.policyViolation, reason: "more than \(OperationRate.perSecond) operations a second")
            return false
        }
        return true
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        writable = context.channel.isWritable
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard !closing else { return }
        switch error {
        case NIOWebSocketError.invalidFrameLength:
            close(.messageTooBig)
        case is NIOWebSocketError:
            close(.protocolError)
        default:
            environment.logger.debug("subscriber connection error", metadata: ["error": "\(error)", "id": "\(id)"])
            context.close(promise: nil)
        }
    }

    private func message(_ buffer: ByteBuffer) {
        guard buffer.readableBytes <= environment.maxMessageBytes else { return close(.messageTooBig) }
        let bytes = Array(buffer.readableBytesView)
        guard String(validating: bytes, as: UTF8.self) != nil else { return close(.invalidPayload) }
        guard principal != nil else { return }
        switch ClientMessage.parse(bytes) {
        case .success(.subscribe(let topic, let resume)):
            subscribe(topic, resume: resume)
        case .success(.unsubscribe(let topic)):
            subscriptions.remove(topic)
            environment.driver.unsubscribe(id, from: topic, reason: nil)
        case .success(.refresh(let token)):
            let now = NIODeadline.now()
            if let last = lastRefresh, now - last < Self.refreshInterval {
                return send(ControlFrame.error(.badRequest, "at most one refresh per 10 s"))
            }
            lastRefresh = now
            refresh(token)
        case .success(.ping):
            send(ControlFrame.pong)
        case .failure(.badRequest(let why)):
            send(ControlFrame.error(.badRequest, why))
        case .failure(.unknownOp(let op)):
            send(ControlFrame.error(.unknownOp, "unknown op " + op))
        }
    }

    // MARK: Subscriptions

    private func subscribe(_ topic: String, resume: ResumePoint?) {
        guard let principal else { return }
        guard TopicName.isValidTopicOrPattern(topic) else {
            return send(ControlFrame.error(.badRequest, "invalid topic", topic: topic))
        }
        guard principal.grants.covers(topic) else {
            return send(ControlFrame.error(.forbidden, "topic not granted", topic: topic))
        }
        if !subscriptions.contains(topic), subscriptions.count >= environment.maxSubscriptions {
            return send(
                ControlFrame.error(
                    .tooManySubscriptions, "at most \(environment.maxSubscriptions) subscriptions", topic: topic))
        }
        if !subscriptions.contains(topic), TopicName.patternPrefix(topic) != nil,
            subscriptions.count(where: { TopicName.patternPrefix($0) != nil }) >= environment.maxPatternSubscriptions
        {
            return send(
                ControlFrame.error(
                    .tooManySubscriptions, "at most \(environment.maxPatternSubscriptions) pattern subscriptions",
                    topic: topic))
        }
        subscriptions.insert(topic)
        environment.driver.subscribe(id, to: topic, resume: resume)
    }

    /// The hub's answer to a subscription, in order with live events.
    func subscribed(to topic: String, _ subscription: Subscription) {
        guard let context, !closing, subscriptions.contains(topic) else { return }
        if subscription.refused {
            // The relay-wide pattern bound; in cluster mode the coordinator still lists the
            // subscription, so it is ended there too (the hub holds nothing to end).
            subscriptions.remove(topic)
            environment.driver.unsubscribe(id, from: [topic])
            return send(
                ControlFrame.error(
                    .tooManySubscriptions, "the relay holds all the pattern subscriptions it may", topic: topic))
        }
        let pingInterval = toldPingInterval ? nil : ControlFrame.seconds(environment.pingInterval)
        toldPingInterval = true
        write(
            ControlFrame.subscribed(topic: topic, subscription: subscription, pingInterval: pingInterval),
            flush: subscription.frames.isEmpty)
        guard let last = subscription.frames.last else { return }
        // Replay may exceed the outbound bound: it is counted apart and released as it drains.
        let bytes = subscription.frames.reduce(0) { $0 + $1.readableBytes }
        replayOutstanding += bytes
        for frame in subscription.frames.dropLast() { context.write(wrapOutboundOut(frame), promise: nil) }
        let promise = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(last), promise: promise)
        promise.futureResult.assumeIsolated().whenComplete { _ in self.replayOutstanding -= bytes }
    }

    /// The hub's answer to an unsubscribe, after every event it had planned for this topic.
    func unsubscribed(from topic: String, reason: String?) {
        guard !closing, !subscriptions.contains(topic) else { return }
        send(ControlFrame.unsubscribed(topic: topic, reason: reason))
    }

    // MARK: Refresh and expiry

    private func refresh(_ token: String) {
        guard let context else { return }
        refreshing = true
        let verifier = environment.verifier
        context.eventLoop.makeFutureWithTask { await verifier.verify(token) }
            .assumeIsolated()
            .whenSuccess { result in self.refreshed(result) }
    }

    private func refreshed(_ result: Result<Principal, TokenError>) {
        refreshing = false
        guard !closing, let current = principal else { return }
        let fresh: Principal
        switch result {
        case .failure(let error):
            return refuse(error.reason, message: error.description)
        case .success(let principal) where principal.subject != current.subject:
            return refuse("malformed", message: "refresh token names another sub")
        case .success(let principal):
            fresh = principal
        }
        principal = fresh
        expiresAt = Self.deadline(fresh)
        send(ControlFrame.refreshed(exp: fresh.expiresAt))
        for topic in subscriptions.sorted() where !fresh.grants.covers(topic) {
            subscriptions.remove(topic)
            environment.driver.unsubscribe(id, from: topic, reason: "forbidden")
        }
    }

    private func refuse(_ reason: String, message: String) {
        environment.metrics.authFailureClosed(reason: reason)
        environment.logger.info("subscriber closed", metadata: ["reason": "\(message)", "id": "\(id)"])
        send(ControlFrame.error(.unauthorized, message))
        close(.unauthorized)
    }

    /// The monotonic deadline of the token's end; the wall clock is read once, now.
    private static func deadline(_ principal: Principal) -> NIODeadline? {
        guard let until = principal.validUntil else { return nil }
        // Capped at ten years, within TimeAmount's range.
        let seconds = min(max(0, until - Date().timeIntervalSince1970), 315_360_000)
        return .now() + .nanoseconds(Int64(seconds * 1e9))
    }

    /// Called by the loop's timer: token expiry, then heartbeat.
    func tick(now: NIODeadline, sendPing: Bool, deadAfter: TimeAmount) {
        guard !closing, let context else { return }
        if let expiresAt, !refreshing, now >= expiresAt {
            return refuse("expired", message: "token expired")
        }
        guard sendPing else { return }
        if now - lastHeard > deadAfter {
            environment.logger.debug("subscriber did not answer pings", metadata: ["id": "\(id)"])
            closing = true
            context.close(promise: nil)
        } else {
            write(ControlFrame.ping, flush: true)
        }
    }

    // MARK: Writing

    /// Live events from a fan-out batch; the loop flushes once after the whole batch.
    func deliver(_ frames: [ByteBuffer], _ range: Range<Int>) {
        guard let context, !closing else { return }
        for index in range { context.write(wrapOutboundOut(frames[index]), promise: nil) }
    }

    func flushDelivered() {
        flushPending = false
        guard let context, !closing else { return }
        context.flush()
        guard !writable else { return }
        let buffered = (try? context.channel.syncOptions?.getOption(ChannelOptions.bufferedWritableBytes)) ?? 0
        if buffered - replayOutstanding > environment.maxOutboundBytes {
            environment.metrics.slowSubscriberClosed()
            environment.logger.info("slow subscriber cut off", metadata: ["id": "\(id)", "owed": "\(buffered)"])
            close(.tryAgainLater, reason: "too slow")
        }
    }

    /// An answer to the client. Answers count against `--max-outbound-bytes` like live events:
    /// a client that asks and never reads would otherwise grow the relay's memory.
    private func send(_ frame: ByteBuffer) {
        write(frame, flush: true)
        guard let context, !closing, !writable else { return }
        let buffered = (try? context.channel.syncOptions?.getOption(ChannelOptions.bufferedWritableBytes)) ?? 0
        if buffered - replayOutstanding > environment.maxOutboundBytes {
            environment.metrics.slowSubscriberClosed()
            environment.logger.info("subscriber does not read its answers", metadata: ["id": "\(id)", "owed": "\(buffered)"])
            close(.tryAgainLater, reason: "too slow")
        }
    }

    private func write(_ frame: ByteBuffer, flush: Bool) {
        guard let context, !closing else { return }
        if flush {
            context.writeAndFlush(wrapOutboundOut(frame), promise: nil)
        } else {
            context.write(wrapOutboundOut(frame), promise: nil)
        }
    }

    func closeNow() {
        closing = true
        context?.channel.close(promise: nil)
    }

    /// Sends a close frame behind whatever is queued, then half-closes and lets the
    /// peer finish: closing at once could reset the connection and lose the close frame.
    func close(_ code: CloseCode, reason: String = "") {
        guard let context, !closing else { return }
        closing = true
        let channel = context.channel
        let promise = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(ControlFrame.close(code, reason: reason)), promise: promise)
        let deadline = context.eventLoop.scheduleTask(in: .seconds(2)) { channel.close(promise: nil) }
        promise.futureResult.whenComplete { result in
            if case .failure = result {
                deadline.cancel()
                channel.close(promise: nil)
            } else {
                channel.close(mode: .output, promise: nil)
            }
        }
        channel.closeFuture.whenComplete { _ in deadline.cancel() }
    }
}
