// ChannelMessage: what the subscription connection hands on, and the relay's
// payload format inside it.
//
// A pub/sub push is kept as slices of the buffer it was read from: the event
// line inside `<seq>:<epoch>:<line>` goes on to subscribers without being
// copied, in the same buffer. The payload parser is strict on purpose: every
// relay of a cluster derives its order from `seq` and its resets from `epoch`,
// so a payload that is not exactly what the sequencing script publishes (a
// foreign publisher on our prefix, a truncated message) must be reported and
// dropped, never guessed at. It throws a typed error and never traps, so one
// bad message costs one log line, not the relay.

import NIOCore

/// One `message` or `pmessage` push from Redis, as slices of the buffer it was read from.
public struct RedisChannelMessage: Sendable, Equatable {
    /// The channel the message was published to.
    public var channel: ByteBuffer
    /// The pattern that matched, for a `pmessage` (a subscription made with `PSUBSCRIBE`); nil for
    /// a `message` (a subscription made with `SUBSCRIBE`).
    public var pattern: ByteBuffer?
    /// The message as published.
    public var payload: ByteBuffer

    /// Creates a message from its parts.
    public init(channel: ByteBuffer, pattern: ByteBuffer? = nil, payload: ByteBuffer) {
        self.channel = channel
        self.pattern = pattern
        self.payload = payload
    }

    /// The payload parsed as the relay's `<seq>:<epoch>:<line>`.
    ///
    /// - Throws: ``RelayMessagePayloadError`` when the payload is not in that format.
    public func relayPayload() throws(RelayMessagePayloadError) -> RelayMessagePayload {
        try RelayMessagePayload(parsing: self.payload)
    }
}

/// The payload the sequencing script publishes for one event: `<seq>:<epoch>:<line>`.
public struct RelayMessagePayload: Sendable, Equatable {
    /// The longest epoch accepted. The relay makes 12-character epochs; the margin leaves room
    /// for a later change without accepting arbitrary junk.
    public static let maximumEpochLength = 64

    /// The event's sequence number in its topic, at least 1.
    public var seq: UInt64
    /// The topic's epoch: ASCII letters and digits.
    public var epoch: String
    /// The event line as received from the emitter, without `seq`: a slice of the payload (no copy).
    /// It may contain any bytes, `:` and CR LF included.
    public var line: ByteBuffer

    /// Creates a payload from its parts.
    public init(seq: UInt64, epoch: String, line: ByteBuffer) {
        self.seq = seq
        self.epoch = epoch
        self.line = line
    }

    /// Parses `<seq>:<epoch>:<line>`.
    ///
    /// `seq` is a decimal of 1 to 20 digits without sign or leading zero, at least 1 and at most
    /// `UInt64.max`; `epoch` is 1 to ``maximumEpochLength`` ASCII letters and digits; `line` is
    /// everything after the second `:`, whatever it holds (possibly nothing).
    ///
    /// - Throws: ``RelayMessagePayloadError`` naming what is wrong; `payload` is not changed.
    public init(parsing payload: ByteBuffer) throws(RelayMessagePayloadError) {
        func fail(_ reason: RelayMessagePayloadError.Reason) -> RelayMessagePayloadError {
            RelayMessagePayloadError(reason, payload: payload)
        }
        let colon = UInt8(ascii: ":")
        let view = payload.readableBytesView
        guard let firstColon = view.firstIndex(of: colon) else { throw fail(.missingSeparator) }

        // seq
        let seqBytes = view[view.startIndex..<firstColon]
        guard !seqBytes.isEmpty else { throw fail(.badSeq) }
        guard seqBytes.count == 1 || seqBytes.first != UInt8(ascii: "0") else { throw fail(.badSeq) }
        var seq: UInt64 = 0
        for byte in seqBytes {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { throw fail(.badSeq) }
            let (times10, overflow1) = seq.multipliedReportingOverflow(by: 10)
            let (sum, overflow2) = times10.addingReportingOverflow(UInt64(byte - UInt8(ascii: "0")))
            guard !overflow1, !overflow2 else { throw fail(.seqOutOfRange) }
            seq = sum
        }
        guard seq >= 1 else { throw fail(.seqOutOfRange) }

        // epoch
        let epochStart = view.index(after: firstColon)
        guard let secondColon = view[epochStart...].firstIndex(of: colon) else { throw fail(.missingSeparator) }
        let epochBytes = view[epochStart..<secondColon]
        guard !epochBytes.isEmpty, epochBytes.count <= Self.maximumEpochLength,
            epochBytes.allSatisfy({ byte in
                (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
                    || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                    || (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
            })
        else { throw fail(.badEpoch) }

        // line: the rest, as a slice. Indices of the view are offsets into the buffer's storage.
        let lineStart = view.index(after: secondColon)
        let offset = lineStart - view.startIndex
        self.seq = seq
        self.epoch = String(decoding: epochBytes, as: UTF8.self)
        self.line = payload.getSlice(at: payload.readerIndex + offset, length: payload.readableBytes - offset)!
    }
}

/// A pub/sub payload that is not `<seq>:<epoch>:<line>`.
public struct RelayMessagePayloadError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What was wrong.
    public enum Reason: Sendable, Hashable {
        /// Fewer than two `:` in the payload.
        case missingSeparator
        /// `seq` is empty, has a sign, a leading zero, or a byte that is not a digit.
        case badSeq
        /// `seq` is 0 or larger than `UInt64.max`.
        case seqOutOfRange
        /// `epoch` is empty, longer than ``RelayMessagePayload/maximumEpochLength``, or holds a byte
        /// that is not an ASCII letter or digit.
        case badEpoch
    }

    /// How many bytes of the payload the description shows.
    public static let shownBytes = 64

    /// What was wrong.
    public var reason: Reason
    /// The start of the payload (at most ``shownBytes`` bytes), non-printable bytes as `\xNN`: for the log.
    public var payloadPrefix: String
    /// The length of the whole payload.
    public var payloadLength: Int

    /// Creates the error for `payload`, keeping only its start.
    public init(_ reason: Reason, payload: ByteBuffer) {
        self.reason = reason
        self.payloadLength = payload.readableBytes
        var text = ""
        for byte in payload.readableBytesView.prefix(Self.shownBytes) {
            switch byte {
            case UInt8(ascii: "\\"):
                text += "\\\\"
            case 0x20..<0x7F:
                text.unicodeScalars.append(UnicodeScalar(byte))
            default:
                let hex = String(byte, radix: 16)
                text += "\\x" + (hex.count == 1 ? "0" + hex : hex)
            }
        }
        self.payloadPrefix = text
    }

    public var description: String {
        let what: String
        switch self.reason {
        case .missingSeparator: what = "expected <seq>:<epoch>:<line>, found fewer than two ':'"
        case .badSeq: what = "seq is not a decimal without sign or leading zero"
        case .seqOutOfRange: what = "seq is 0 or larger than \(UInt64.max)"
        case .badEpoch:
            what = "epoch is not 1 to \(RelayMessagePayload.maximumEpochLength) ASCII letters and digits"
        }
        let more = self.payloadLength > Self.shownBytes ? "... (\(self.payloadLength) bytes)" : ""
        return "malformed relay message: \(what): \"\(self.payloadPrefix)\"\(more)"
    }
}
