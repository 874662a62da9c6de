// The two ways a Redis command can fail, kept apart on purpose: a reply error
// (`-ERR ...`, `-NOSCRIPT ...`, `-OOM ...`) answers one command and leaves the
// connection in step, so later commands go on; a connection error means the
// connection is unusable (closed, bytes that are not RESP, a bound reached) and
// every command still waiting fails with it. Callers branch on this: a reply
// error is about the command, a connection error is a reason to reconnect and
// resend.

import NIOCore
import RESP

/// An error reply from Redis to one command, such as `ERR wrong number of arguments` or
/// `NOSCRIPT No matching script`. The connection stays usable.
public struct RedisReplyError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The reply text without the leading `-`, e.g. `NOSCRIPT No matching script. Please use EVAL.`
    public var message: String

    /// Creates the error for a reply text (without `-` and CRLF).
    public init(message: String) {
        self.message = message
    }

    /// The error code: the first word of the message when it is upper case (`ERR`, `NOSCRIPT`,
    /// `OOM`, `WRONGTYPE`, ...); otherwise the empty string.
    public var code: Substring {
        let word = self.message.prefix { $0 != " " }
        return word.allSatisfy { ($0 >= "A" && $0 <= "Z") || $0 == "_" } ? word : ""
    }

    public var description: String { "Redis replied with an error: \(self.message)" }
}

/// Why a command connection cannot carry a command: the command was not answered, or not sent.
public enum RedisConnectionError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The connection closed (by either side) before the reply came.
    case closed
    /// Redis sent bytes that are not RESP2 (or exceed a decoder limit); the connection was closed.
    case protocolError(String)
    /// Redis sent a reply when no command was waiting for one; the connection was closed.
    case unexpectedReply(String)
    /// The socket failed (reset, broken pipe, ...); the connection was closed.
    case socketError(String)
    /// `maximumOutstandingCommands` commands already wait for their replies; this one was not sent.
    case tooManyOutstandingCommands(limit: Int)
    /// The commands waiting for replies already hold `maximumOutstandingBytes`; this one was not sent.
    case tooManyOutstandingBytes(limit: Int)
    /// The command's encoder wrote no bytes; nothing was sent.
    case emptyCommand
    /// The connection was made but a step of logging in failed (`AUTH`, `SELECT`, `INFO server`).
    case handshakeFailed(step: String, reason: String)

    public var description: String {
        switch self {
        case .closed:
            return "the Redis connection closed before the reply came"
        case .protocolError(let reason):
            return "Redis sent bytes that are not RESP2 (\(reason)); connection closed"
        case .unexpectedReply(let reply):
            return "Redis sent a reply no command was waiting for (\(reply)); connection closed"
        case .socketError(let reason):
            return "the Redis connection failed (\(reason)); connection closed"
        case .tooManyOutstandingCommands(let limit):
            return "\(limit) Redis commands already wait for replies; command not sent"
        case .tooManyOutstandingBytes(let limit):
            return "Redis commands of \(limit) bytes already wait for replies; command not sent"
        case .emptyCommand:
            return "the command encoder wrote nothing; command not sent"
        case .handshakeFailed(let step, let reason):
            return "connected to Redis, but \(step) failed: \(reason)"
        }
    }

    /// Whether the connection is gone (so that reconnecting and resending is the remedy), as
    /// opposed to this one command being refused by a bound.
    public var isConnectionLost: Bool {
        switch self {
        case .closed, .protocolError, .unexpectedReply, .socketError, .handshakeFailed: return true
        case .tooManyOutstandingCommands, .tooManyOutstandingBytes, .emptyCommand: return false
        }
    }
}

extension RedisConnectionError {
    /// What an error caught in a Redis channel means for the connection; both connections use it.
    static func caught(_ error: any Error) -> RedisConnectionError {
        switch error {
        case let error as RedisConnectionError: return error
        case let error as RESPError: return .protocolError(error.description)
        // The stream ended inside a reply: the peer closed, the bytes were not bad.
        case ByteToMessageDecoderError.leftoverDataWhenDone: return .closed
        case let error as ByteToMessageDecoderError: return .protocolError("\(error)")
        default: return .socketError("\(error)")
        }
    }
}
