using Microsoft.Extensions.Logging;
using UblkSharp.Nbd;
using UblkSharp.Targets;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Tests.Nbd;

/// <summary>
/// A failing target is reported to the server's logger, never to the console, and a flood of
/// failures is not a flood of log lines. Serial: the tests take over Console.Error for the process.
/// </summary>
[Collection(nameof(NbdSerialCollection))]
public class NbdServerLoggingTests
{
    [Fact]
    public void ATargetThatThrowsReachesTheLoggerAndNotTheConsole()
    {
        var log = new CapturingLoggerFactory();
        var console = WithConsoleError(() =>
        {
            using var s = new TestServer(new ThrowingTarget(1 << 20), options: new NbdServerOptions { LoggerFactory = log });
            using var c = new RawNbd(s.SocketPath).Connect();
            c.Request(CmdRead, 1, 0, 512);
            Assert.Equal((EIO, 1ul), c.ReadSimpleReply());
            // Within the throttle's interval: counted, answered, not logged again.
            for (ulong i = 2; i < 50; i++)
            {
                c.Request(CmdRead, i, 0, 512);
                Assert.Equal((EIO, i), c.ReadSimpleReply());
            }
            Assert.Equal(49, s.Server.TargetExceptions);
        });
        Assert.Equal("", console);
        var entry = Assert.Single(log.Entries, e => e.EventId.Id == 207);
        Assert.Equal(LogLevel.Error, entry.Level);
        Assert.Equal(typeof(NbdServer).FullName, entry.Category);
        Assert.Equal("nbd: target threw on READ at 0", entry.Message);
        Assert.Equal("boom", Assert.IsType<InvalidOperationException>(entry.Exception).Message);
    }

    [Fact]
    public void WithoutALoggerNothingIsWrittenAnywhere()
    {
        var console = WithConsoleError(() =>
        {
            using var s = new TestServer(new ThrowingTarget(1 << 20));
            using var c = new RawNbd(s.SocketPath).Connect();
            c.Request(CmdRead, 1, 0, 512);
            Assert.Equal((EIO, 1ul), c.ReadSimpleReply());
        });
        Assert.Equal("", console);
    }

    private static string WithConsoleError(Action action)
    {
        var saved = Console.Error;
        using var captured = new StringWriter();
        Console.SetError(captured);
        try
        {
            action();
        }
        finally
        {
            Console.SetError(saved);
        }
        return captured.ToString();
    }

    private sealed class ThrowingTarget(long size) : BlockTarget
    {
        public override long Size => size;

        public override string Kind => "throws";

        public override int Read(Span<byte> buffer, long offset) => offset == 0 ? throw new InvalidOperationException("boom") : buffer.Length;
    }
}
