// RESPValueDecoder: the RESPDecoder as a pipeline stage.
//
// The connection handlers put `ByteToMessageHandler(RESPValueDecoder())` in
// front of themselves and receive one RESPValue per reply, in order. Being a
// NIOSingleStepByteToMessageDecoder, it also works with
// NIOSingleStepByteToMessageProcessor (async channels and tests).

import NIOCore

/// Decodes a byte stream from Redis into ``RESPValue``s, one per reply.
public struct RESPValueDecoder: NIOSingleStepByteToMessageDecoder, Sendable {
    public typealias InboundOut = RESPValue

    private var decoder: RESPDecoder

    /// Creates a pipeline decoder around `decoder` (whose limits apply).
    public init(_ decoder: RESPDecoder = RESPDecoder()) {
        self.decoder = decoder
    }

    /// The next complete reply, or nil when more bytes are needed.
    public mutating func decode(buffer: inout ByteBuffer) throws -> RESPValue? {
        try self.decoder.decode(buffer: &buffer)
    }

    /// The next complete reply at the end of the stream.
    ///
    /// - Throws: `ByteToMessageDecoderError.leftoverDataWhenDone` when the stream ended inside a
    ///   reply (a reply that will never come), or ``RESPError`` on bad bytes.
    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> RESPValue? {
        if let value = try self.decoder.decode(buffer: &buffer) {
            return value
        }
        if buffer.readableBytes > 0 {
            throw ByteToMessageDecoderError.leftoverDataWhenDone(buffer)
        }
        return nil
    }
}
