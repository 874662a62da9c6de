import Foundation
import Testing

@testable import RelayWatch

@Suite struct FrameDecodingTests {
    @Test func progressEventFromAnEmitter() throws {
        let frame = RelayFrame.decode(
            #"{"seq":3,"topic":"task:42","type":"progress","progress":60,"current":3,"total":5,"message":"3/5"}"#)
        #expect(frame == .event(WatchEvent(topic: "task:42", seq: 3, type: "progress", percent: 60, message: "3/5")))
    }

    @Test(arguments: [
        (#"{"seq":1,"topic":"t","percent":42.5}"#, 42.5),
        (#"{"seq":1,"topic":"t","progress":3,"total":4}"#, 75.0),
        (#"{"seq":1,"topic":"t","current":1,"total":8,"progress":99}"#, 12.5),
        (#"{"seq":1,"topic":"t","progress":250}"#, 100.0),
    ])
    func percentShapes(text: String, expected: Double) throws {
        guard case .event(let event) = RelayFrame.decode(text) else { Issue.record("not an event"); return }
        #expect(event.percent == expected)
    }

    @Test func booleansAreNotNumbers() {
        guard case .event(let event) = RelayFrame.decode(#"{"seq":2,"topic":"t","type":"complete","success":true,"progress":true}"#)
        else { Issue.record("not an event"); return }
        #expect(event.percent == nil)
        #expect(event.success == true)
    }

    @Test func errorEventsShowTheirError() {
        guard case .event(let event) = RelayFrame.decode(#"{"seq":2,"topic":"t","type":"error","error":"ValueError: bad"}"#)
        else { Issue.record("not an event"); return }
        #expect(event.message == "ValueError: bad")
    }

    @Test func controlFrames() {
        #expect(
            RelayFrame.decode(#"{"op":"subscribed","topic":"task:1","epoch":"e-1","seq":4,"recovered":true}"#)
                == .subscribed(topic: "task:1", epoch: "e-1", seq: 4, recovered: true))
        #expect(
            RelayFrame.decode(#"{"op":"error","code":"unauthorized","message":"token expired"}"#)
                == .error(code: "unauthorized", message: "token expired", topic: nil))
        #expect(RelayFrame.decode("not json") == nil)
    }
}

@Suite struct RendererTests {
    func view(_ topic: String, _ events: [WatchEvent], at times: [Double]) -> TopicView {
        var view = TopicView(topic: topic)
        for (event, time) in zip(events, times) { view.apply(event, at: time) }
        return view
    }

    @Test func barFills() {
        #expect(Renderer.bar(percent: 50, width: 10) == "#####-----")
        #expect(Renderer.bar(percent: nil, width: 4) == "----")
        #expect(Renderer.bar(percent: 100, width: 4) == "####")
        #expect(Renderer.bar(percent: 99.9, width: 4) == "###-")
    }

    @Test func percentages() {
        #expect(Renderer.formatPercent(60) == "60%")
        #expect(Renderer.formatPercent(66.66) == "66.7%")
        #expect(Renderer.formatPercent(0) == "0%")
    }

    @Test func aLineAsAPersonSeesIt() {
        let v = view("task:42", [WatchEvent(topic: "task:42", seq: 1, type: "progress", percent: 60, message: "3/5")], at: [100])
        let line = Renderer.line(for: v, topicWidth: 7, width: 80, now: 104.2)
        #expect(line.hasPrefix("task:42  [##############----------]    60%  3/5"))
        #expect(line.hasSuffix("0.0/s   4s ago"))
        #expect(line.count <= 79)
    }

    @Test func narrowTerminalsStillFit() {
        let v = view("task:with-a-very-long-name-indeed", [WatchEvent(topic: "x", seq: 1, percent: 10, message: String(repeating: "m", count: 200))], at: [0])
        for width in [20, 40, 60, 132] {
            for line in Renderer.lines(views: [v], status: "connected", width: width, now: 1) {
                #expect(line.count <= width - 1, "width \(width): \(line)")
            }
        }
    }

    @Test func phases() {
        let done = view("t", [WatchEvent(topic: "t", seq: 2, type: "complete", message: nil, success: true)], at: [0])
        #expect(done.phase == .complete && done.percent == 100 && done.message == "done")
        let failed = view(
            "t",
            [WatchEvent(topic: "t", seq: 1, percent: 30), WatchEvent(topic: "t", seq: 2, type: "error", message: "boom")],
            at: [0, 1])
        #expect(failed.phase == .failed && failed.percent == 30)
        #expect(Renderer.line(for: failed, topicWidth: 1, width: 80, now: 1).contains("30%  ERROR boom"))
        let waiting = TopicView(topic: "t")
        #expect(Renderer.line(for: waiting, topicWidth: 1, width: 80, now: 0).contains("-  waiting"))
    }

    @Test func rateOverTheWindow() {
        let v = view("t", (1...5).map { WatchEvent(topic: "t", seq: UInt64($0)) }, at: [0, 1, 2, 3, 4])
        #expect(v.rate(at: 4) == 1)
        #expect(v.rate(at: 100) == nil)
    }

    @Test func tooManyTopicsForTheScreen() {
        let views = (1...30).map { TopicView(topic: "task:\($0)") }
        let lines = Renderer.lines(views: views, status: "s", width: 80, height: 10, now: 0)
        #expect(lines.count == 9)
        #expect(lines[7].contains("and 23 more"))
        #expect(lines.last == "s")
    }

    @Test func redrawMovesUpOverTheOldBlock() {
        #expect(Renderer.redraw(["a", "b"], previous: 0) == "\r\u{1B}[2Ka\n\u{1B}[2Kb\n")
        #expect(Renderer.redraw(["a"], previous: 2) == "\r\u{1B}[2A\u{1B}[2Ka\n\u{1B}[J")
    }

    @Test func plainLine() {
        let event = WatchEvent(topic: "task:42", seq: 7, type: "progress", percent: 60, message: "3/5\nnext")
        let line = Renderer.plainLine(event, at: Date(timeIntervalSince1970: 1_700_000_000.25))
        #expect(line == "2023-11-14T22:13:20.250Z task:42 7 progress 60% 3/5 next")
        #expect(Renderer.plainLine(WatchEvent(topic: "t", seq: 1), at: Date(timeIntervalSince1970: 0)) == "1970-01-01T00:00:00.000Z t 1 - -")
    }
}
