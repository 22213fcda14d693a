using System.Diagnostics;
using UblkSharp.Interop;
using UblkSharp.Nbd;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Nbd;

/// <summary>The nbd target (a remote export as a BlockTarget) against nbdkit and against our own server.</summary>
public class NbdTargetTests
{
    [Fact]
    public void RoundTripsAgainstNbdkitsMemoryPlugin()
    {
        using var nbdkit = new Nbdkit("memory", "32M");
        using var target = new NbdTarget(NbdUri.Unix(nbdkit.SocketPath));
        Assert.Equal(32L << 20, target.Size);
        Assert.Equal("nbd", target.Kind);
        Assert.Equal($"nbd+unix:///?socket={nbdkit.SocketPath}", target.Recipe["uri"]);
        Exercise(target);
    }

    [Fact]
    public void RoundTripsAgainstOurServerAndOverTcp()
    {
        using var s = new TestServer(new MemoryTarget(32 << 20), "remote", tcp: true);
        using var target = new NbdTarget(NbdUri.Parse(s.Uri));
        Assert.True(target.CanDiscard);
        Assert.True(target.HasVolatileCache);
        Exercise(target);
    }

    [Fact]
    public void ManyCallersUseSeveralConnectionsAndSeeOneAnother()
    {
        using var s = new TestServer(new MemoryTarget(32 << 20));
        using var target = new NbdTarget(NbdUri.Parse(s.Uri), new NbdTargetOptions { Connections = 4 });
        var threads = Enumerable.Range(0, 8).Select(t => new Thread(() =>
        {
            var data = new byte[65536];
            var back = new byte[65536];
            for (var i = 0; i < 50; i++)
            {
                Array.Fill(data, (byte)(t + i));
                var offset = ((t * 50) + i) * 65536L;
                Assert.Equal(data.Length, target.Write(data, offset));
                Assert.Equal(back.Length, target.Read(back, offset));
                Assert.Equal(data, back);
            }
        })).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        Assert.InRange(target.OpenConnections, 2, 4);
        Assert.True(s.Server.ConnectionsAccepted >= 2);
    }

    [Fact]
    public void OurServerCanExportAnNbdTarget()
    {
        // nbdkit -> nbd target -> our server -> qemu-io: the same target code on both sides.
        using var nbdkit = new Nbdkit("memory", "16M");
        using var s = new TestServer(new NbdTarget(NbdUri.Unix(nbdkit.SocketPath)), "proxy");
        var output = Tools.Ok("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 2M", "-c", "read -P 0x61 0 2M", "-c", "write -z 4M 1M", "-c", "read -P 0 4M 1M", s.Uri);
        Assert.DoesNotContain("fail", output, StringComparison.OrdinalIgnoreCase);
        var direct = Tools.Ok("qemu-io", "-f", "raw", "-c", "read -P 0x61 0 2M", $"nbd+unix:///?socket={nbdkit.SocketPath}");
        Assert.DoesNotContain("fail", direct, StringComparison.OrdinalIgnoreCase);
    }

    [Fact]
    public void ALostConnectionIsRetriedWithoutFailingTheRequest()
    {
        using var memory = new MemoryTarget(8 << 20);
        using var server = new TestServer(memory, ownsTarget: false);
        var path = server.SocketPath;
        using var target = new NbdTarget(NbdUri.Unix(path), new NbdTargetOptions { Timeout = TimeSpan.FromSeconds(20) });
        var data = Enumerable.Repeat((byte)0x77, 4096).ToArray();
        Assert.Equal(4096, target.Write(data, 0));
        // The server goes away and comes back 700 ms later on the same socket.
        server.Server.Dispose();
        using var again = new RestartLater(memory, path, TimeSpan.FromMilliseconds(700));
        var back = new byte[4096];
        var clock = Stopwatch.StartNew();
        Assert.Equal(4096, target.Read(back, 0)); // waits for the server, then succeeds
        Assert.InRange(clock.Elapsed, TimeSpan.FromMilliseconds(500), TimeSpan.FromSeconds(15));
        Assert.Equal(data, back);
        Assert.Equal(4096, target.Write(data, 8192));
        Assert.True(target.Reconnects >= 1);
    }

    [Fact]
    public void RetriesStopAtTheBoundAndLaterRequestsFailFast()
    {
        var memory = new MemoryTarget(8 << 20);
        var server = new TestServer(memory);
        // A bound of 4 s, so that "waited for the bound" and "failed fast" stay seconds apart on a loaded machine.
        using var target = new NbdTarget(NbdUri.Unix(server.SocketPath), new NbdTargetOptions { Timeout = TimeSpan.FromSeconds(4) });
        server.Dispose();
        var buffer = new byte[4096];
        var clock = Stopwatch.StartNew();
        Assert.Equal(-Errno.EIO, target.Read(buffer, 0));
        Assert.InRange(clock.Elapsed, TimeSpan.FromSeconds(3.5), TimeSpan.FromSeconds(30));
        clock.Restart();
        Assert.Equal(-Errno.EIO, target.Write(buffer, 0));
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(2), $"the second failure took {clock.Elapsed}");
    }

    [Fact]
    public async Task ASilentUpstreamFailsRequestsWithinTheTimeoutAndTheTargetRecovers()
    {
        // The reviewer's case: the peer vanished without a RST. Before the socket timeouts, a read
        // blocked in recv for good (8 minutes and counting in the VM).
        using var memory = new MemoryTarget(8 << 20);
        using var server = new TestServer(memory, "disk", ownsTarget: false);
        using var proxy = SilentProxy.ToUnix(server.SocketPath);
        var target = new NbdTarget(NbdUri.Parse(proxy.Uri("disk")), new NbdTargetOptions { Timeout = TimeSpan.FromSeconds(2) });
        var data = Enumerable.Repeat((byte)0x5a, 4096).ToArray();
        Assert.Equal(4096, target.Write(data, 0));
        Assert.Equal("2", target.Recipe["timeout"]);

        proxy.Forwarding = false;
        var buffer = new byte[4096];
        var clock = Stopwatch.StartNew();
        var ct = TestContext.Current.CancellationToken;
        // Generous for a loaded box, but far from "forever": the bound is 2 s (WaitAsync throws
        // TimeoutException past it).
        var read = await Task.Run(() => target.Read(buffer, 0), ct).WaitAsync(TimeSpan.FromSeconds(30), ct);
        Assert.Equal(-Errno.EIO, read);
        Assert.InRange(clock.Elapsed, TimeSpan.FromSeconds(1.5), TimeSpan.FromSeconds(30));
        // A request arriving while the server is still silent also fails within the bound.
        clock.Restart();
        var write = await Task.Run(() => target.Write(data, 4096), ct).WaitAsync(TimeSpan.FromSeconds(30), ct);
        Assert.Equal(-Errno.EIO, write);

        // The upstream answers again: the next request reconnects and gets through.
        proxy.Forwarding = true;
        var accepted = proxy.Accepted;
        Assert.Equal(4096, target.Read(buffer, 0));
        Assert.Equal(data, buffer);
        Assert.True(proxy.Accepted > accepted, "the target did not reconnect");
        Assert.True(target.Reconnects >= 1);

        // Disposing (the `del` analogue) does not wait on a silent upstream either.
        proxy.Forwarding = false;
        var stuck = Task.Run(() => target.Read(buffer, 0), ct);
        target.Dispose();
        Assert.Equal(-Errno.EIO, await stuck.WaitAsync(TimeSpan.FromSeconds(30), ct));
    }

    [Fact]
    public void TheFactoryTakesATimeout()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20), "disk");
        using var target = (NbdTarget)TargetFactory.Create("nbd", new Dictionary<string, string> { ["uri"] = s.Uri, ["timeout"] = "7" });
        Assert.Equal("7", target.Recipe["timeout"]);
        var e = Assert.Throws<ArgumentException>(() => TargetFactory.Create("nbd", new Dictionary<string, string> { ["uri"] = s.Uri, ["timeout"] = "0" }));
        Assert.Contains("--timeout", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void UnreachableOrRefusingServersGiveClearErrors()
    {
        var dir = Path.Combine(Path.GetTempPath(), $"ublksharp-nbdt-{Guid.NewGuid():N}");
        var e = Assert.Throws<IOException>(() => new NbdTarget(NbdUri.Unix(Path.Combine(dir, "none.sock"))));
        Assert.Contains("cannot connect to nbd+unix:///?socket=", e.Message, StringComparison.Ordinal);
        using var s = new TestServer(new MemoryTarget(1 << 20), "disk");
        var refused = Assert.Throws<NbdHandshakeException>(() => new NbdTarget(NbdUri.Unix(s.SocketPath, "other")));
        Assert.Contains("no export 'other'", refused.Message, StringComparison.Ordinal);
        var factory = Assert.Throws<ArgumentException>(() => TargetFactory.Create("nbd", new Dictionary<string, string>()));
        Assert.Contains("--uri", factory.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => TargetFactory.Create("nbd", new Dictionary<string, string> { ["uri"] = "http://x" }));
    }

    [Theory]
    [InlineData("nbd://127.0.0.1/disk", "tcp://127.0.0.1:10809", "disk")]
    [InlineData("nbd://127.0.0.1:1234", "tcp://127.0.0.1:1234", "")]
    [InlineData("nbd://[::1]:99/a%20b", "tcp://[::1]:99", "a b")]
    [InlineData("nbd+unix:///?socket=/run/x.sock", "unix:///run/x.sock", "")]
    [InlineData("nbd+unix:///exp?socket=/tmp/s", "unix:///tmp/s", "exp")]
    [InlineData("nbds://localhost:1234/e?tls-certificates=/etc/pki", "tcp://localhost:1234", "e")]
    [InlineData("nbds+unix:///e?socket=/tmp/s&tls-certificates=/etc/pki", "unix:///tmp/s", "e")]
    public void UrisParse(string text, string address, string export)
    {
        var uri = NbdUri.Parse(text);
        Assert.Equal(address, uri.Address.ToString());
        Assert.Equal(export, uri.ExportName);
        var tls = text.StartsWith("nbds", StringComparison.Ordinal);
        Assert.Equal(tls, uri.IsTls);
        Assert.Equal(tls ? "/etc/pki" : null, uri.TlsCertificates);
        // Over TCP the server's certificate must name the URI's host; a Unix socket has none.
        Assert.Equal(tls && !uri.Address.IsUnix ? "localhost" : null, uri.TlsHostname);
    }

    [Theory]
    [InlineData("nbds://alice@127.0.0.1:1234/e?tls-psk-file=/k.psk", "tcp://127.0.0.1:1234", "alice")]
    [InlineData("nbds://127.0.0.1/e?tls-psk-file=/k.psk&tls-username=bob", "tcp://127.0.0.1:10809", "bob")]
    [InlineData("nbds+unix://al%40ice@/e?socket=/tmp/s&tls-psk-file=/k.psk", "unix:///tmp/s", "al@ice")]
    [InlineData("nbds://[::1]:99/e?tls-psk-file=/k.psk", "tcp://[::1]:99", null)]
    public void PskUrisParse(string text, string address, string? user)
    {
        var uri = NbdUri.Parse(text);
        Assert.Equal(address, uri.Address.ToString());
        Assert.Equal("e", uri.ExportName);
        Assert.True(uri.IsTls);
        Assert.Equal("/k.psk", uri.TlsPskFile);
        Assert.Equal(user, uri.TlsUsername);
        Assert.Null(uri.TlsCertificates);
    }

    [Theory]
    [InlineData("")]
    [InlineData("127.0.0.1:10809")]
    [InlineData("http://127.0.0.1/")]
    [InlineData("nbds://127.0.0.1/?tls-psk-file=/x&tls-certificates=/y")]
    [InlineData("nbd://alice@127.0.0.1/")]
    [InlineData("nbds://:secret@127.0.0.1/?tls-psk-file=/x")]
    [InlineData("nbds://127.0.0.1/?tls-verify-peer=false")]
    [InlineData("nbds+unix:///disk")]
    [InlineData("nbd+unix:///disk")]
    [InlineData("nbd+unix://host/?socket=/x")]
    [InlineData("nbd://:10809/")]
    [InlineData("nbd://127.0.0.1:99999/")]
    [InlineData("nbd://::1/")]
    [InlineData("nbd://127.0.0.1/?socket=/x")]
    [InlineData("nbd://127.0.0.1/?bogus=1")]
    public void BadUrisAreRefusedWithAReason(string text)
    {
        var e = Assert.Throws<ArgumentException>(() => NbdUri.Parse(text));
        Assert.StartsWith("bad NBD URI", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("tcp://127.0.0.1:10809", "tcp://127.0.0.1:10809")]
    [InlineData("tcp://127.0.0.1", "tcp://127.0.0.1:10809")]
    [InlineData("tcp://[::1]:0", "tcp://[::1]:0")]
    [InlineData("tcp://localhost:5", "tcp://localhost:5")]
    [InlineData("unix:///tmp/a.sock", "unix:///tmp/a.sock")]
    public void ListenAddressesParse(string text, string canonical) => Assert.Equal(canonical, NbdAddress.ParseListen(text).ToString());

    [Theory]
    [InlineData("127.0.0.1:10809")]
    [InlineData("tcp://example.com:10809")]
    [InlineData("tcp://127.0.0.1:70000")]
    [InlineData("tcp://127.0.0.1:x")]
    [InlineData("tcp://::1:5")]
    [InlineData("unix://relative.sock")]
    [InlineData("unix:///")]
    [InlineData("udp://127.0.0.1:1")]
    public void BadListenAddressesAreRefusedWithAReason(string text)
    {
        var e = Assert.Throws<ArgumentException>(() => NbdAddress.ParseListen(text));
        Assert.StartsWith("bad ", e.Message, StringComparison.Ordinal);
    }

    private static void Exercise(NbdTarget target)
    {
        var data = new byte[1 << 20];
        new Random(1).NextBytes(data);
        Assert.Equal(data.Length, target.Write(data, 1 << 20));
        Assert.Equal(4096, target.WriteFua(data.AsSpan(0, 4096), 8 << 20));
        Assert.Equal(0, target.Flush());
        var back = new byte[data.Length];
        Assert.Equal(back.Length, target.Read(back, 1 << 20));
        Assert.Equal(data, back);
        Assert.Equal(0, target.WriteZeroes(1 << 20, 65536, mayUnmap: false));
        Assert.Equal(0, target.Discard(2 << 20, 65536));
        Assert.Equal(0, target.Cache(0, 1 << 20));
        Assert.Equal(65536, target.Read(back.AsSpan(0, 65536), 1 << 20));
        Assert.True(back.AsSpan(0, 65536).IndexOfAnyExcept((byte)0) < 0);
        Assert.Equal(-Errno.EINVAL, target.Read(back.AsSpan(0, 4096), target.Size)); // the server refuses: past the end
    }

    /// <summary>Starts a server on a socket path after a delay, in the background.</summary>
    private sealed class RestartLater : IDisposable
    {
        private readonly Thread _thread;
        private NbdServer? _server;

        public RestartLater(BlockTarget target, string path, TimeSpan delay)
        {
            _thread = new Thread(() =>
            {
                Thread.Sleep(delay);
                _server = NbdServer.Start(NbdAddress.Unix(path), new NbdExport("", target));
            });
            _thread.Start();
        }

        public void Dispose()
        {
            _thread.Join();
            _server?.Dispose();
        }
    }
}

/// <summary>nbdkit serving a plugin on a Unix socket in a temporary directory, for one test.</summary>
internal sealed class Nbdkit : IDisposable
{
    private readonly Process _process;
    private readonly string _dir;

    public Nbdkit(params string[] pluginArgs)
        : this(0, pluginArgs)
    {
    }

    /// <summary>With <paramref name="port"/> above 0: on TCP 127.0.0.1 at that port instead of a Unix socket.</summary>
    public Nbdkit(int port, params string[] pluginArgs)
    {
        _dir = Path.Combine(Path.GetTempPath(), $"ublksharp-nbdkit-{Guid.NewGuid():N}"[..34]);
        Directory.CreateDirectory(_dir);
        SocketPath = Path.Combine(_dir, "nbdkit.sock");
        Port = port;
        var psi = new ProcessStartInfo(Tools.Require("nbdkit")) { RedirectStandardError = true, RedirectStandardOutput = true };
        var pidFile = Path.Combine(_dir, "nbdkit.pid");
        string[] listen = port > 0 ? ["-i", "127.0.0.1", "-p", port.ToString(System.Globalization.CultureInfo.InvariantCulture)] : ["-U", SocketPath];
        // nbdkit writes its pid file once it accepts connections (the socket file exists earlier).
        foreach (var a in (string[])["-f", "--exit-with-parent", "--pidfile", pidFile, .. listen, .. pluginArgs])
        {
            psi.ArgumentList.Add(a);
        }
        _process = Process.Start(psi)!;
        var clock = Stopwatch.StartNew();
        while (!File.Exists(pidFile) || new FileInfo(pidFile).Length == 0)
        {
            if (_process.HasExited)
            {
                Assert.Fail($"nbdkit exited: {_process.StandardError.ReadToEnd()}");
            }
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), "nbdkit did not start");
            Thread.Sleep(20);
        }
    }

    public string SocketPath { get; }

    /// <summary>The TCP port, or 0 on the Unix socket.</summary>
    public int Port { get; }

    /// <summary>Ends nbdkit at once (SIGKILL), as a server that dies under IO.</summary>
    public void Kill()
    {
        _process.Kill();
        _process.WaitForExit(10_000);
    }

    public void Dispose()
    {
        if (!_process.HasExited)
        {
            _process.Kill();
            _process.WaitForExit(10_000);
        }
        _process.Dispose();
        try
        {
            Directory.Delete(_dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
