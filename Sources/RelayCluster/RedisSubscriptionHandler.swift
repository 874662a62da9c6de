// RedisSubscriptionHandler: the pipeline stage of a connection in pub/sub mode.
//
// In pub/sub mode Redis no longer answers one reply per command: SUBSCRIBE a b c
// is answered by one confirmation per channel, and messages arrive in between,
// unasked. So this is not the command handler's FIFO of replies, but a FIFO of
// commands that still await confirmations, each with the number it awaits.
// Redis handles a connection's commands in order, so confirmations arrive in the
// order the channels were sent, and the head of the FIFO is always the command
// being confirmed; a confirmation of another kind, or one nobody waits for,
// means the stream is not what we think it is, and the connection is closed.
// The FIFO only ever holds what the caller asked for: one entry per command
// sent, each counting down to zero.
//
// Liveness (after Centrifugo, whose subscription connections could stay attached
// to a demoted server after a failover while publishes went to the new one): when
// nothing at all was read for `probeInterval`, the handler asks its owner to
// publish a probe on the connection's own probe channel, through the command
// connection; if that probe is not read back within `probeTimeout`, this
// connection is not where the cluster's messages go, and it closes itself with
// a reason that says so.

import Logging
import NIOCore
import RESP

/// Tracks subscription confirmations, hands messages on, and probes liveness, on one Redis
/// connection in pub/sub mode. Lives on the channel's event loop.
final class RedisSubscriptionHandler: ChannelInboundHandler {
    typealias InboundIn = RESPValue
    typealias OutboundOut = ByteBuffer

    /// The four subscription commands, named as Redis names their confirmations.
    enum Kind: String, Sendable {
        case subscribe
        case unsubscribe
        case psubscribe
        case punsubscribe
    }

    private struct Pending {
        var kind: Kind
        /// Confirmations still to come for this command.
        var remaining: Int
        var promise: EventLoopPromise<Void>
    }

    /// The most channels (or patterns) one command carries; larger requests are split.
    let maximumChannelsPerCommand: Int
    /// The channel whose messages are this connection's own probes; not handed on.
    let probeChannel: ByteBuffer
    let probeInterval: TimeAmount
    let probeTimeout: TimeAmount
    private let publishProbe: @Sendable () -> EventLoopFuture<Void>
    private let onMessage: @Sendable (RedisChannelMessage) -> Void
    private let logger: Logger

    private var pending = CircularBuffer<Pending>(initialCapacity: 8)
    private var context: ChannelHandlerContext?
    /// Why the connection is unusable; set once.
    private var failure: RedisConnectionError?
    /// Why the connection closed, when it was not the owner's wish; reported by ``closePromise``.
    private var closeReason: RedisSubscriptionError?
    /// Completes when the handler leaves the pipeline: succeeded when the owner closed the
    /// connection, failed with the reason otherwise.
    let closePromise: EventLoopPromise<Void>
    /// Whether ``closeByOwner()`` came before any other reason to close.
    private var closedByOwner = false

    private var lastRead: NIODeadline = .now()
    private var livenessCheck: Scheduled<Void>?
    private var probeDeadline: Scheduled<Void>?
    /// Probes sent whose message has not come back.
    private(set) var probeOutstanding = false
    /// Probes that came back, for tests and metrics.
    private(set) var probesReturned = 0

    init(
        probeChannel: String,
        probeInterval: TimeAmount,
        probeTimeout: TimeAmount,
        maximumChannelsPerCommand: Int,
        publishProbe: @escaping @Sendable () -> EventLoopFuture<Void>,
        onMessage: @escaping @Sendable (RedisChannelMessage) -> Void,
        closePromise: EventLoopPromise<Void>,
        logger: Logger
    ) {
        precondition(maximumChannelsPerCommand > 0, "a command must carry at least one channel")
        precondition(probeInterval > .zero && probeTimeout > .zero, "probe times must be positive")
        self.probeChannel = ByteBuffer(string: probeChannel)
        self.probeInterval = probeInterval
        self.probeTimeout = probeTimeout
        self.maximumChannelsPerCommand = maximumChannelsPerCommand
        self.publishProbe = publishProbe
        self.onMessage = onMessage
        self.closePromise = closePromise
        self.logger = logger
    }

    /// Commands whose confirmations have not all come.
    var pendingCommands: Int { self.pending.count }

    /// Sends `kind` for `names`, in commands of at most ``maximumChannelsPerCommand`` names, and
    /// completes `promise` when Redis has confirmed every name (at once for no names). An error
    /// reply fails it with ``RedisReplyError``; a lost connection with ``RedisConnectionError``.
    func send(_ kind: Kind, _ names: [String], promise: EventLoopPromise<Void>) {
        if let failure = self.failure {
            promise.fail(failure)
            return
        }
        guard let context = self.context else {
            promise.fail(RedisConnectionError.closed)
            return
        }
        guard !names.isEmpty else {
            // UNSUBSCRIBE with no argument means "all": never sent by accident.
            promise.succeed(())
            return
        }
        let name = kind.rawValue.uppercased()
        var confirmations: [EventLoopFuture<Void>] = []
        confirmations.reserveCapacity(names.count / self.maximumChannelsPerCommand + 1)
        var start = 0
        while start < names.count {
            let end = min(start + self.maximumChannelsPerCommand, names.count)
            var buffer = context.channel.allocator.buffer(capacity: 16 + (end - start) * 32)
            RESPCommand.writeHeader(count: 1 + end - start, into: &buffer)
            name.writeRESPBulkString(into: &buffer)
            for index in start..<end {
                names[index].writeRESPBulkString(into: &buffer)
            }
            let batch = context.eventLoop.makePromise(of: Void.self)
            self.pending.append(Pending(kind: kind, remaining: end - start, promise: batch))
            confirmations.append(batch.futureResult)
            context.write(self.wrapOutboundOut(buffer), promise: nil)
            start = end
        }
        context.flush()
        if confirmations.count == 1 {
            promise.completeWith(confirmations[0])
        } else {
            EventLoopFuture.andAllSucceed(confirmations, promise: promise)
        }
    }

    /// Closes the connection because its owner asked; ``closePromise`` then succeeds.
    func closeByOwner() {
        if self.failure == nil {
            self.failure = .closed
            self.closedByOwner = true
        }
        self.context?.close(promise: nil)
    }

    // MARK: Failure

    /// Marks the connection unusable (the first reason wins), fails every pending command, and
    /// closes the channel.
    private func fail(_ error: RedisConnectionError, reason: RedisSubscriptionError? = nil) {
        if self.failure == nil {
            self.failure = error
            self.closeReason = reason ?? .connectionLost(error)
        }
        self.stopProbing()
        let failure = self.failure!
        let waiting = self.pending
        self.pending.removeAll()
        for entry in waiting {
            entry.promise.fail(failure)
        }
        self.context?.close(promise: nil)
    }

    // MARK: Liveness

    /// Starts watching for silence; called once the connection is logged in.
    func startProbing() {
        self.lastRead = .now()
        self.scheduleLivenessCheck()
    }

    private func scheduleLivenessCheck() {
        guard let context = self.context, self.failure == nil else { return }
        self.livenessCheck = context.eventLoop.assumeIsolated().scheduleTask(deadline: self.lastRead + self.probeInterval) {
            self.livenessCheck = nil
            self.checkLiveness()
        }
    }

    private func checkLiveness() {
        guard self.failure == nil, !self.probeOutstanding, let context = self.context else { return }
        if NIODeadline.now() < self.lastRead + self.probeInterval {
            // Something was read since the check was scheduled.
            self.scheduleLivenessCheck()
            return
        }
        self.probeOutstanding = true
        self.logger.debug(
            "nothing from Redis pub/sub for a while; sending a probe",
            metadata: ["channel": "\(String(buffer: self.probeChannel))"])
        self.probeDeadline = context.eventLoop.assumeIsolated().scheduleTask(in: self.probeTimeout) {
            self.probeDeadline = nil
            self.probeTimedOut()
        }
        let logger = self.logger
        self.publishProbe().whenFailure { error in
            // The deadline still decides: a probe that cannot be published cannot come back.
            logger.warning("publishing the pub/sub probe failed", metadata: ["error": "\(error)"])
        }
    }

    private func probeReturned() {
        guard self.probeOutstanding else { return }
        self.probeOutstanding = false
        self.probesReturned += 1
        self.probeDeadline?.cancel()
        self.probeDeadline = nil
        self.lastRead = .now()
        self.scheduleLivenessCheck()
    }

    private func probeTimedOut() {
        guard self.probeOutstanding, self.failure == nil else { return }
        let reason = RedisSubscriptionError.probeTimedOut(
            probeChannel: String(buffer: self.probeChannel), probeTimeout: self.probeTimeout)
        self.logger.warning("Redis pub/sub connection failed its liveness probe; closing it", metadata: ["reason": "\(reason)"])
        self.fail(.closed, reason: reason)
    }

    private func stopProbing() {
        self.livenessCheck?.cancel()
        self.livenessCheck = nil
        self.probeDeadline?.cancel()
        self.probeDeadline = nil
        self.probeOutstanding = false
    }

    // MARK: ChannelInboundHandler

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.fail(.closed)
        self.context = nil
        if self.closedByOwner {
            self.closePromise.succeed(())
        } else {
            self.closePromise.fail(self.closeReason ?? .connectionLost(.closed))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.fail(.closed)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let reason = RedisConnectionError.caught(error)
        if self.failure == nil {
            self.logger.warning("Redis pub/sub connection failed", metadata: ["error": "\(error)"])
        }
        self.fail(reason)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.lastRead = .now()
        context.fireChannelReadComplete()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard self.failure == nil else { return }
        let value = self.unwrapInboundIn(data)
        switch value {
        case .array(let elements?) where elements.count >= 3:
            guard case .bulkString(let kindBytes?) = elements[0] else { break }
            switch (kindBytes.readableBytesView.count, elements.count) {
            case (7, 3) where kindBytes.readableBytesView.elementsEqual("message".utf8):
                guard case .bulkString(let channel?) = elements[1], case .bulkString(let payload?) = elements[2] else { break }
                if channel == self.probeChannel {
                    self.probeReturned()
                } else {
                    self.onMessage(RedisChannelMessage(channel: channel, pattern: nil, payload: payload))
                }
                return
            case (8, 4) where kindBytes.readableBytesView.elementsEqual("pmessage".utf8):
                guard case .bulkString(let pattern?) = elements[1], case .bulkString(let channel?) = elements[2],
                    case .bulkString(let payload?) = elements[3]
                else { break }
                self.onMessage(RedisChannelMessage(channel: channel, pattern: pattern, payload: payload))
                return
            case (_, 3):
                guard let kind = Kind(rawValue: String(buffer: kindBytes)), case .integer = elements[2] else { break }
                self.confirmed(kind, value: value)
                return
            default:
                break
            }
        case .error(let text):
            // An error reply answers a whole command (e.g. NOPERM for one of its channels), before
            // any confirmation of it.
            guard let head = self.pending.popFirst() else { break }
            head.promise.fail(RedisReplyError(message: String(buffer: text)))
            return
        default:
            break
        }
        self.unexpected(value)
    }

    private func confirmed(_ kind: Kind, value: RESPValue) {
        guard var head = self.pending.first, head.kind == kind else {
            self.unexpected(value)
            return
        }
        head.remaining -= 1
        if head.remaining == 0 {
            self.pending.removeFirst()
            head.promise.succeed(())
        } else {
            self.pending[self.pending.startIndex] = head
        }
    }

    private func unexpected(_ value: RESPValue) {
        self.logger.error("Redis sent a pub/sub push nobody was waiting for", metadata: ["push": "\(value)"])
        self.fail(.unexpectedReply(String(describing: value).prefix(200).description))
    }
}
