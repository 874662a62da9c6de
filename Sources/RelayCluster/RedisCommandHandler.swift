// RedisCommandHandler: the pipeline stage that pairs Redis replies with commands.
//
// Redis answers the commands of one connection in the order they were sent, so
// a FIFO of promises is all the bookkeeping pipelining needs (the shape of
// RediStack's handler of the same name). Two things are added here:
//
//  * Bounds. The FIFO holds at most `maximumOutstandingCommands` promises and
//    the commands behind them at most `maximumOutstandingBytes`; beyond either,
//    the command is refused at once with a RedisConnectionError, and nothing
//    is written. This also bounds the bytes NIO holds when Redis stops reading,
//    since unsent commands are counted as outstanding.
//  * One write per event-loop tick. Commands are encoded straight into one
//    outbound buffer, and a flush is scheduled for the end of the tick, so that
//    64 commands issued together leave in one write(2), not 64.
//
// Once the connection fails (closed, undecodable bytes, a reply no command
// waits for), the first reason is kept: every pending promise fails with it,
// and so does every later command, at once.

import Logging
import NIOCore
import RESP

/// Pairs replies with commands, in order, on one Redis connection. Lives on the channel's event loop.
final class RedisCommandHandler: ChannelInboundHandler {
    typealias InboundIn = RESPValue
    typealias OutboundOut = ByteBuffer

    private struct Pending {
        var promise: EventLoopPromise<RESPValue>
        var bytes: Int
    }

    /// The most commands that may wait for replies at once.
    let maximumOutstandingCommands: Int
    /// The most bytes the commands waiting for replies may hold.
    let maximumOutstandingBytes: Int
    private let logger: Logger

    private var pending: CircularBuffer<Pending>
    private var outstandingBytes = 0
    /// Commands encoded in this tick and not yet written.
    private var outbound: ByteBuffer
    private var flushScheduled = false
    private var context: ChannelHandlerContext?
    /// Why the connection is unusable; set once.
    private var failure: RedisConnectionError?

    init(maximumOutstandingCommands: Int, maximumOutstandingBytes: Int, logger: Logger) {
        precondition(maximumOutstandingCommands > 0 && maximumOutstandingBytes > 0, "bounds must be positive")
        self.maximumOutstandingCommands = maximumOutstandingCommands
        self.maximumOutstandingBytes = maximumOutstandingBytes
        self.logger = logger
        self.pending = CircularBuffer(initialCapacity: 64)
        self.outbound = ByteBuffer()
    }

    /// Commands waiting for their replies.
    var outstandingCommands: Int { self.pending.count }

    /// Encodes one command with `build` and queues `promise` for its reply; or fails `promise`
    /// at once when the connection is unusable or a bound is reached (nothing is then written).
    func enqueue(promise: EventLoopPromise<RESPValue>, build: (inout ByteBuffer) -> Void) {
        if let failure = self.failure {
            promise.fail(failure)
            return
        }
        guard self.pending.count < self.maximumOutstandingCommands else {
            promise.fail(RedisConnectionError.tooManyOutstandingCommands(limit: self.maximumOutstandingCommands))
            return
        }
        let start = self.outbound.writerIndex
        build(&self.outbound)
        let size = self.outbound.writerIndex - start
        guard size > 0 else {
            promise.fail(RedisConnectionError.emptyCommand)
            return
        }
        // One command larger than the whole bound may still go alone, or it could never be sent.
        if self.outstandingBytes + size > self.maximumOutstandingBytes, !self.pending.isEmpty {
            self.outbound.moveWriterIndex(to: start)
            promise.fail(RedisConnectionError.tooManyOutstandingBytes(limit: self.maximumOutstandingBytes))
            return
        }
        self.pending.append(Pending(promise: promise, bytes: size))
        self.outstandingBytes += size
        self.scheduleFlush()
    }

    private func scheduleFlush() {
        guard !self.flushScheduled, let context = self.context else { return }
        self.flushScheduled = true
        context.eventLoop.assumeIsolated().execute {
            self.flushOutbound()
        }
    }

    private func flushOutbound() {
        self.flushScheduled = false
        guard let context = self.context, self.failure == nil, self.outbound.readableBytes > 0 else { return }
        context.writeAndFlush(self.wrapOutboundOut(self.outbound), promise: nil)
        // Reuse the storage in the next tick (written in place when the write completed at once,
        // the common case; clear() allocates afresh when NIO still holds it), unless a burst made
        // it large.
        if self.outbound.capacity > 1 << 20 {
            self.outbound = context.channel.allocator.buffer(capacity: 4096)
        } else {
            self.outbound.clear()
        }
    }

    /// Marks the connection unusable and fails every pending command with `error` (the first
    /// reason wins). Promises are failed after the state change, so a callback that sends again
    /// is refused rather than queued.
    private func fail(_ error: RedisConnectionError) {
        if self.failure == nil {
            self.failure = error
        }
        let failure = self.failure!
        self.outbound.clear()
        let waiting = self.pending
        self.pending.removeAll()
        self.outstandingBytes = 0
        if !waiting.isEmpty {
            self.logger.debug(
                "failing Redis commands that wait for replies",
                metadata: ["commands": "\(waiting.count)", "reason": "\(failure)"])
        }
        for entry in waiting {
            entry.promise.fail(failure)
        }
    }

    // MARK: ChannelInboundHandler

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.outbound = context.channel.allocator.buffer(capacity: 4096)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.fail(.closed)
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.fail(.closed)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let reason = RedisConnectionError.caught(error)
        if self.failure == nil {
            self.logger.warning("Redis connection failed", metadata: ["error": "\(error)"])
        }
        self.fail(reason)
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let value = self.unwrapInboundIn(data)
        guard self.failure == nil else { return }
        guard let head = self.pending.popFirst() else {
            self.logger.error("Redis sent a reply no command was waiting for", metadata: ["reply": "\(value)"])
            self.fail(.unexpectedReply(String(describing: value).prefix(200).description))
            context.close(promise: nil)
            return
        }
        self.outstandingBytes -= head.bytes
        if case .error(let text) = value {
            head.promise.fail(RedisReplyError(message: String(buffer: text)))
        } else {
            head.promise.succeed(value)
        }
    }
}

/// The subscription connection logs in through this handler, then takes it out of the pipeline
/// and puts its own in its place (see ``RedisSubscriptionConnection``).
extension RedisCommandHandler: RemovableChannelHandler {}
