// `progress-relay emit`: sends one event, or the NDJSON lines of standard input.

import ArgumentParser
import Foundation
import ProgressEmitter
import RelayServer

struct EmitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "emit",
        abstract: "Send events to a running relay.",
        discussion: "Without --topic, sends the NDJSON lines read from standard input.")

    @Option(help: "The relay's ingest socket (default: $PROGRESS_RELAY_SOCKET or \(RelayConfiguration.defaultSocketPath)).")
    var socket: String?

    @Option(help: "The event's topic.")
    var topic: String?

    @Option(help: "The event's type, e.g. progress, complete, error.")
    var type: String?

    @Option(name: .customLong("field"), help: "KEY=VALUE; a VALUE that parses as JSON is taken as JSON (repeatable).")
    var fields: [String] = []

    func validate() throws {
        if topic == nil, type != nil || !fields.isEmpty {
            throw ValidationError("--type and --field need --topic")
        }
    }

    func run() throws {
        let path = socket ?? RelaySocket.defaultPath
        let payload: [UInt8]
        if let topic {
            payload = Array((try EventLine.make(topic: topic, type: type, fields: fields) + "\n").utf8)
        } else {
            payload = Array(FileHandle.standardInput.readDataToEndOfFile())
        }
        do {
            let connection = try RelaySocket(path: path)
            try connection.write(payload)
            if payload.last != UInt8(ascii: "\n") { try connection.write([UInt8(ascii: "\n")]) }
            connection.finishWriting()
            let answers = try connection.readToEnd()
            let rejected = answers.split(separator: UInt8(ascii: "\n")).map { String(decoding: $0, as: UTF8.self) }
            guard rejected.isEmpty else {
                for answer in rejected { FileHandle.standardError.write(Data("progress-relay: rejected: \(answer)\n".utf8)) }
                throw CLIError.failure("\(rejected.count) line(s) rejected by the relay")
            }
        } catch let error as RelaySocketError {
            throw CLIError.failure(error.description)
        }
    }
}

/// One event line built from flags, without reordering or re-encoding the values given.
enum EventLine {
    static func make(topic: String, type: String?, fields: [String]) throws -> String {
        var members = ["\"topic\":" + quoted(topic)]
        if let type { members.append("\"type\":" + quoted(type)) }
        for field in fields {
            guard let equals = field.firstIndex(of: "="), equals != field.startIndex else {
                throw CLIError.usage("--field \(field): expected KEY=VALUE")
            }
            let key = String(field[..<equals])
            let value = String(field[field.index(after: equals)...])
            members.append(quoted(key) + ":" + (isJSON(value) ? value : quoted(value)))
        }
        return "{" + members.joined(separator: ",") + "}"
    }

    private static func isJSON(_ text: String) -> Bool {
        guard !text.isEmpty, !text.contains("\n") else { return false }
        return (try? JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed])) != nil
    }

    private static func quoted(_ text: String) -> String {
        let data = try! JSONSerialization.data(withJSONObject: [text], options: [.withoutEscapingSlashes])
        let array = String(decoding: data, as: UTF8.self)
        return String(array.dropFirst().dropLast())
    }
}
