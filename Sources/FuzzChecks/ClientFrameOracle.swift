// ClientFrameOracle: the FuzzClientFrame check. `ClientMessage.parse` (which uses
// JSONDecoder) on any text message, compared with what the contract says the
// same message means when read by Foundation's `JSONSerialization`.
//
// Rules, on every input:
//  * the answer is an op, `bad_request` or `unknown_op` (the type says so), and
//    the same on a second call;
//  * the bare text `ping` is the ping op;
//  * input JSONSerialization rejects is a `bad_request` (but for a number out of
//    Double's range or a lone surrogate escape, which are JSON to the relay), and so is
//    input it accepts where the relay's JSON is stricter (the ingest line's allowed
//    disagreements: a BOM, a trailing comma, UTF-16, nesting past 512);
//  * for a JSON object: a field among op, topic, epoch, token that is present,
//    not null and not a string is a `bad_request`; no op is `bad_request`; a
//    known op without its field (topic, token) is `bad_request`; `since` of
//    subscribe must be a whole number from 0 to 2^64-1 or it is `bad_request`;
//    an unknown op is `unknown_op` naming it; otherwise the op with the fields
//    as given (epoch "" when absent);
//  * anything else (arrays, strings, numbers, null) is a `bad_request`.
// Not compared (no answer to compare with): objects with duplicate top-level keys
// (the two parsers may keep different ones), lines with `1e999` or a lone surrogate
// escape, and `since` above 2^53 (JSONSerialization may round it).

import Foundation
import RelayHub
@_spi(Fuzzing) import RelayServer

enum ClientFrameOracle {
    /// What the contract says a message means.
    enum Expected: Equatable {
        case message(ClientMessage)
        case badRequest
        case unknownOp(String)
        /// Nothing to compare with (see the header comment).
        case unknown
    }

    static func check(_ input: [UInt8]) throws(FuzzViolation) {
        let result = ClientMessage.parse(input)
        let again = ClientMessage.parse(input)
        try require(result == again, "\(describe(input)): \(result), then \(again)")
        if case .failure(.badRequest(let reason)) = result {
            try require(!reason.isEmpty, "\(describe(input)): bad_request without a reason")
        }

        // JSONSerialization drops U+FEFF in strings (see IngestLineOracle), JSONDecoder keeps it:
        // compare on the same message with U+2060 in its place.
        let subject = IngestLineOracle.replacingBOMsInStrings(input)
        let answer = subject == input ? result : ClientMessage.parse(subject)
        let expected = expectation(subject)
        let said = "\(describe(subject)): \(answer), expected \(expected)"
        switch expected {
        case .unknown:
            return
        case .message(let message):
            try require(answer == .success(message), said)
        case .badRequest:
            guard case .failure(.badRequest) = answer else { throw FuzzViolation(said) }
        case .unknownOp(let op):
            try require(answer == .failure(.unknownOp(op)), said)
        }
    }

    static func expectation(_ input: [UInt8]) -> Expected {
        if input.elementsEqual("ping".utf8) { return .message(.ping) }
        guard let object = try? JSONSerialization.jsonObject(with: Data(input), options: [.fragmentsAllowed]) else {
            // The relay takes `1e999` and lone surrogate escapes for JSON (then JSONDecoder judges).
            return IngestLineOracle.relayOnlyReason(input) != nil ? .unknown : .badRequest
        }
        // A BOM, a trailing comma, UTF-16, nesting past 512: not JSON to the relay.
        if IngestLineOracle.foundationOnlyReason(input) != nil { return .badRequest }
        guard let fields = object as? [String: Any] else { return .badRequest }
        if topLevelKeyCount(input) != fields.count { return .unknown }

        var strings: [String: String] = [:]
        for name in ["op", "topic", "epoch", "token"] {
            switch fields[name] {
            case nil, is NSNull: continue
            case let text as String: strings[name] = text
            default: return .badRequest
            }
        }
        guard let op = strings["op"] else { return .badRequest }
        switch op {
        case "subscribe":
            guard let topic = strings["topic"] else { return .badRequest }
            switch since(fields["since"]) {
            case .absent: return .message(.subscribe(topic: topic, resume: nil))
            case .value(let since):
                return .message(.subscribe(topic: topic, resume: ResumePoint(epoch: strings["epoch"] ?? "", since: since)))
            case .invalid: return .badRequest
            case .unknown: return .unknown
            }
        case "unsubscribe":
            guard let topic = strings["topic"] else { return .badRequest }
            return .message(.unsubscribe(topic: topic))
        case "refresh":
            guard let token = strings["token"] else { return .badRequest }
            return .message(.refresh(token: token))
        case "ping":
            return .message(.ping)
        default:
            return .unknownOp(op)
        }
    }

    enum Since {
        case absent, value(UInt64), invalid, unknown
    }

    /// `since` as the contract reads it: a whole number from 0 to 2^64-1.
    static func since(_ value: Any?) -> Since {
        switch value {
        case nil, is NSNull: return .absent
        case let number as NSNumber:
            if String(cString: number.objCType) == "c" { return .invalid }  // true, false
            let double = number.doubleValue
            guard double.isFinite else { return .invalid }
            if double >= 0x1p53 { return .unknown }
            guard double >= 0, double.rounded() == double else { return .invalid }
            return .value(UInt64(double))
        default:
            return .invalid
        }
    }

    /// How many keys the top-level object has, duplicates included (a naive count of
    /// `"...":` at depth 1, enough to notice duplicates).
    static func topLevelKeyCount(_ input: [UInt8]) -> Int {
        var depth = 0
        var count = 0
        var afterString = false
        IngestLineOracle.forEachByteOutsideStrings(input) { _, byte in
            switch byte {
            case UInt8(ascii: "["), UInt8(ascii: "{"): depth += 1
            case UInt8(ascii: "]"), UInt8(ascii: "}"): depth -= 1
            case UInt8(ascii: ":") where depth == 1 && afterString: count += 1
            default: break
            }
            // A string's closing quote, then only whitespace, then the colon.
            if byte == UInt8(ascii: "\"") {
                afterString = true
            } else if ![0x20, 0x09, 0x0A, 0x0D].contains(byte) {
                afterString = false
            }
        }
        return count
    }
}
