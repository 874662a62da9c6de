// SubscriberOutbound: what a subscriber connection owes its peer, WebSocket and SSE alike.
//
// A connection is cut when it owes more than `--max-outbound-bytes` of live events and answers.
// The replay after a subscribe and a pattern's snapshot do not count: they are written at once,
// counted here as outstanding until their last write completes, and subtracted from what the
// channel holds. Writability is kept from the channel's events: `channel.isWritable` on every
// flush showed in the fan-out profile (a pipeline walk and a retain per call).

import NIOCore

struct SubscriberOutbound {
    let maxOutboundBytes: Int
    /// Bytes of replay and snapshots still unsent.
    private(set) var replayOutstanding = 0
    var writable = true

    init(maxOutboundBytes: Int) {
        self.maxOutboundBytes = maxOutboundBytes
    }

    /// Whether the channel holds more than the bound of live bytes. Costs nothing more than a
    /// flag while the channel is writable, the common case on every flush (the channel is not even
    /// looked up then).
    func isOverBound(_ context: ChannelHandlerContext) -> Bool {
        guard !writable else { return false }
        return owed(context) - replayOutstanding > maxOutboundBytes
    }

    /// Bytes the channel holds unwritten.
    func owed(_ context: ChannelHandlerContext) -> Int {
        (try? context.channel.syncOptions?.getOption(ChannelOptions.bufferedWritableBytes)) ?? 0
    }

    /// Counts a replay (or snapshot) as outstanding, before it is written with `writeReplay`.
    mutating func replayStarted(_ frames: [ByteBuffer]) -> Int {
        let bytes = frames.reduce(0) { $0 + $1.readableBytes }
        replayOutstanding += bytes
        return bytes
    }

    /// Writes a replay behind whatever is queued and flushes it; `written` runs once its last
    /// frame is out (possibly within this call), and must give its bytes back with
    /// `replayWritten(_:)`. Static, so that no access to the owner's value is open meanwhile.
    static func writeReplay(_ frames: [ByteBuffer], context: ChannelHandlerContext, written: @escaping () -> Void) {
        guard let last = frames.last else { return }
        for frame in frames.dropLast() { context.write(NIOAny(frame), promise: nil) }
        let promise = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(NIOAny(last), promise: promise)
        promise.futureResult.assumeIsolated().whenComplete { _ in written() }
    }

    mutating func replayWritten(_ bytes: Int) { replayOutstanding -= bytes }
}
