// ClientMessage: what a subscriber may ask, parsed from one text message.
//
// Unknown fields are ignored (room for later versions); a missing or
// malformed field is a `bad_request`, an unknown `op` is `unknown_op`.

import Foundation
import RelayHub

/// A subscriber's request. `@_spi(Fuzzing)` public only so that the fuzz checks (FuzzChecks,
/// Fuzz/) can call `parse`; not part of the package's API.
@_spi(Fuzzing) public enum ClientMessage: Equatable, Sendable {
    case subscribe(topic: String, resume: ResumePoint?)
    case unsubscribe(topic: String)
    case refresh(token: String)
    case ping

    public enum ParseError: Error, Equatable, Sendable {
        case badRequest(String)
        case unknownOp(String)
    }

    private struct Fields: Decodable {
        var op: String?
        var topic: String?
        var epoch: String?
        var since: Since?
        var token: String?
    }

    /// `since` as given. Decoded apart because JSONDecoder reports a number that does not fit
    /// (`-1`, `0.5`, `1e400`) as "not valid JSON" for the whole message.
    private enum Since: Decodable {
        case value(UInt64)
        case invalid(String)

        init(from decoder: any Decoder) throws {
            let container = try decoder.singleValueContainer()
            if let value = try? container.decode(UInt64.self) {
                self = .value(value)
            } else if let value = try? container.decode(Double.self), value.isFinite {
                self = .invalid(
                    value < 0
                        ? "since must not be negative" : value.rounded() != value
                        ? "since must be a whole number" : "since is too large (at most 18446744073709551615)")
            } else if (try? container.decode(String.self)) != nil || (try? container.decode(Bool.self)) != nil {
                self = .invalid("since must be a number")
            } else {
                self = .invalid("since must be a whole number from 0 to 18446744073709551615")
            }
        }
    }

    /// Parses one text message: an op, or why it is refused (`bad_request`, `unknown_op`).
    public static func parse(_ bytes: [UInt8]) -> Result<ClientMessage, ParseError> {
        if bytes == Array("ping".utf8) { return .success(.ping) }
        // JSONDecoder does not look at what it skips: a raw control character, `\q`, `01` or a
        // trailing comma in a field it ignores passed (found by FuzzClientFrame). Such a message is
        // not JSON, so the syntax is checked strictly first, by the ingest line's parser.
        if case .failure(let error) = IngestLineParser.parse(bytes), error == .invalidJSON || error == .invalidUTF8 {
            return .failure(.badRequest("not JSON"))
        }
        let fields: Fields
        do {
            fields = try JSONDecoder().decode(Fields.self, from: Data(bytes))
        } catch DecodingError.typeMismatch(_, let context) where context.codingPath.isEmpty {
            return .failure(.badRequest("not a JSON object"))
        } catch DecodingError.typeMismatch(_, let context), DecodingError.valueNotFound(_, let context) {
            let field = context.codingPath.first?.stringValue ?? "a field"
            return .failure(.badRequest("\(field) has the wrong type"))
        } catch DecodingError.dataCorrupted(let context) where !context.codingPath.isEmpty {
            let field = context.codingPath.first?.stringValue ?? "a field"
            return .failure(.badRequest("\(field) is malformed"))
        } catch {
            return .failure(.badRequest("not JSON"))
        }
        guard let op = fields.op else { return .failure(.badRequest("missing op")) }
        switch op {
        case "subscribe":
            guard let topic = fields.topic else { return .failure(.badRequest("missing topic")) }
            var resume: ResumePoint?
            switch fields.since {
            case .none: resume = nil
            case .value(let since): resume = ResumePoint(epoch: fields.epoch ?? "", since: since)
            case .invalid(let reason): return .failure(.badRequest(reason))
            }
            return .success(.subscribe(topic: topic, resume: resume))
        case "unsubscribe":
            guard let topic = fields.topic else { return .failure(.badRequest("missing topic")) }
            return .success(.unsubscribe(topic: topic))
        case "refresh":
            guard let token = fields.token else { return .failure(.badRequest("missing token")) }
            return .success(.refresh(token: token))
        case "ping":
            return .success(.ping)
        default:
            return .failure(.unknownOp(op))
        }
    }
}
