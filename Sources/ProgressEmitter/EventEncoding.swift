// EventEncoding: one event as one NDJSON line, `topic` and `type` first.

import Foundation

enum EventEncoding {
    /// `{"topic":T,"type":Y,<fields>}\n`, or nil when `fields` is not a JSON object.
    static func line(topic: String, type: String?, fields: some Encodable) -> [UInt8]? {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let body = try? encoder.encode(fields), body.first == UInt8(ascii: "{"), body.last == UInt8(ascii: "}"),
            let head = try? encoder.encode(Head(topic: topic, type: type))
        else { return nil }
        var line = [UInt8](head.dropLast())
        if body.count > 2 {
            line.append(UInt8(ascii: ","))
            line.append(contentsOf: body.dropFirst())
        } else {
            line.append(UInt8(ascii: "}"))
        }
        line.append(UInt8(ascii: "\n"))
        return line
    }

    /// Encoded with `topic` before `type` (sorted keys put them in that order).
    private struct Head: Encodable {
        var topic: String
        var type: String?
    }
}

/// A dictionary of encodable values, encoded as one JSON object.
struct EncodableDictionary: Encodable {
    var values: [String: any Encodable & Sendable]

    private struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: Key.self)
        for (key, value) in values {
            try container.encode(value, forKey: Key(stringValue: key))
        }
    }
}
