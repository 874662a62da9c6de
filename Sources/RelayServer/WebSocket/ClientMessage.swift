// ClientMessage: what a subscriber may ask, parsed from one text message.
//
// Unknown fields are ignored (room for later versions); a missing or
// malformed field is a `bad_request`, an unknown `op` is `unknown_op`.

import Foundation
import RelayHub

enum ClientMessage: Equatable {
    case subscribe(topic: String, resume: ResumePoint?)
    case unsubscribe(topic: String)
    case refresh(token: String)
    case ping

    enum ParseError: Error, Equatable {
        case badRequest(String)
        case unknownOp(String)
    }

    private struct Fields: Decodable {
        var op: String?
        var topic: String?
        var epoch: String?
        var since: UInt64?
        var token: String?
    }

    static func parse(_ bytes: [UInt8]) -> Result<ClientMessage, ParseError> {
        if bytes == Array("ping".utf8) { return .success(.ping) }
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
            let resume = fields.since.map { ResumePoint(epoch: fields.epoch ?? "", since: $0) }
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
