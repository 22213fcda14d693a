using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using UblkSharp.Nbd;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Targets;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Tests.Nbd;

[CollectionDefinition(nameof(NbdSerialCollection), DisableParallelization = true)]
public class NbdSerialCollection;

/// <summary>Our server on a Unix socket in a fresh temporary directory, for one test.</summary>
internal sealed class TestServer : IDisposable
{
    private readonly bool _ownsTarget;

    public TestServer(BlockTarget target, string exportName = "", bool readOnly = false, NbdServerOptions? options = null, bool ownsTarget = true, bool tcp = false)
    {
        Directory = Path.Combine(Path.GetTempPath(), $"ublksharp-nbd-{Guid.NewGuid():N}"[..32]);
        System.IO.Directory.CreateDirectory(Directory);
        Target = target;
        _ownsTarget = ownsTarget;
        Export = new NbdExport(exportName, target, readOnly, "test export");
        var address = tcp ? NbdAddress.Tcp("127.0.0.1", 0) : NbdAddress.Unix(Path.Combine(Directory, "nbd.sock"));
        Server = NbdServer.Start(address, Export, options ?? new NbdServerOptions());
    }

    public string Directory { get; }

    public BlockTarget Target { get; }

    public NbdExport Export { get; }

    public NbdServer Server { get; }

    public string SocketPath => Server.Address.SocketPath!;

    /// <summary>The export's URI as libnbd and qemu write it.</summary>
    public string Uri => Server.Address.IsUnix
        ? $"nbd+unix:///{System.Uri.EscapeDataString(Export.Name)}?socket={SocketPath}"
        : $"nbd://{Server.Address.Host}:{Server.Address.Port}/{System.Uri.EscapeDataString(Export.Name)}";

    public string TempPath(string name) => Path.Combine(Directory, name);

    public void Dispose()
    {
        Server.Dispose();
        if (_ownsTarget)
        {
            Target.Dispose();
        }
        try
        {
            System.IO.Directory.Delete(Directory, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>The real clients (qemu-utils, libnbd-bin, python3-libnbd, nbdkit, fio; gnutls-bin's psktool), run with a time bound.</summary>
internal static class Tools
{
    public static string Require(string tool)
    {
        if (tool.StartsWith('/'))
        {
            return File.Exists(tool) ? tool : throw new InvalidOperationException($"{tool} is missing");
        }
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "/usr/bin:/bin").Split(':').Append("/usr/sbin").Append("/sbin"))
        {
            var path = Path.Combine(dir, tool);
            if (File.Exists(path))
            {
                return path;
            }
        }
        Assert.Fail($"{tool} is not installed: apt-get install -y qemu-utils libnbd-bin python3-libnbd nbdkit nbd-client fio gnutls-bin (./test.sh does)");
        return tool;
    }

    public static (int ExitCode, string Stdout, string Stderr) Run(string tool, IEnumerable<string> args, TimeSpan? timeout = null, string? stdin = null)
    {
        var psi = new ProcessStartInfo(Require(tool)) { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = stdin is not null };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (stdin is not null)
        {
            p.StandardInput.Write(stdin);
            p.StandardInput.Close();
        }
        var limit = timeout ?? TimeSpan.FromSeconds(60);
        if (!p.WaitForExit(limit))
        {
            p.Kill(entireProcessTree: true);
            p.WaitForExit();
            Assert.Fail($"{tool} {string.Join(' ', args)} did not finish within {limit.TotalSeconds} s; stderr: {stderr.Result}");
        }
        p.WaitForExit();
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>Runs a tool that must succeed; returns its stdout.</summary>
    public static string Ok(string tool, params string[] args) => OkWithin(TimeSpan.FromSeconds(60), tool, args);

    public static string OkWithin(TimeSpan timeout, string tool, params string[] args)
    {
        var (code, stdout, stderr) = Run(tool, args, timeout);
        Assert.True(code == 0, $"{tool} {string.Join(' ', args)} exited {code}\nstdout: {stdout}\nstderr: {stderr}");
        return stdout;
    }

    /// <summary>An nbdsh (python3-libnbd) script against a URI; the handle is `h`, connected.</summary>
    public static string Nbdsh(string uri, string script, bool structured = true)
    {
        var prelude = $"h.set_request_structured_replies({(structured ? "True" : "False")})\nh.add_meta_context('base:allocation')\nh.connect_uri({Py(uri)})\n";
        // nbdsh is `python3 -m nbd`; the system python has the module even where PATH prefers another python.
        var (code, stdout, stderr) = Run("/usr/bin/python3", ["-m", "nbd", "-c", "-"], TimeSpan.FromSeconds(60), prelude + script);
        Assert.True(code == 0, $"nbdsh failed ({code}):\n{script}\nstdout: {stdout}\nstderr: {stderr}");
        return stdout;
    }

    public static string Py(string s) => "'" + s.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("'", "\\'", StringComparison.Ordinal) + "'";
}

/// <summary>
/// A hand-driven NBD client for the cases real clients never produce: malformed handshakes and
/// requests, and exact checks of what the server answers.
/// </summary>
internal sealed class RawNbd : IDisposable
{
    public RawNbd(string socketPath, int receiveTimeoutMs = 10_000)
    {
        Socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        Socket.Connect(new UnixDomainSocketEndPoint(socketPath));
        Socket.ReceiveTimeout = receiveTimeoutMs;
    }

    /// <summary>Over TCP (or any stream socket's end point).</summary>
    public RawNbd(System.Net.EndPoint endPoint, int receiveTimeoutMs = 10_000)
    {
        Socket = new Socket(endPoint.AddressFamily, SocketType.Stream, endPoint is UnixDomainSocketEndPoint ? ProtocolType.Unspecified : ProtocolType.Tcp);
        Socket.Connect(endPoint);
        Socket.ReceiveTimeout = receiveTimeoutMs;
    }

    public Socket Socket { get; }

    /// <summary>The maximum payload the server advertised (NBD_INFO_BLOCK_SIZE) in the GO of <see cref="Connect"/>; 0 if none.</summary>
    public uint MaximumPayload { get; private set; }

    public ushort TransmissionFlags { get; private set; }

    public long Size { get; private set; }

    /// <summary>Reads the greeting and checks it; returns the handshake flags.</summary>
    public ushort ReadGreeting()
    {
        var g = Receive(18);
        Assert.Equal(NbdMagic, BinaryPrimitives.ReadUInt64BigEndian(g));
        Assert.Equal(OptionMagic, BinaryPrimitives.ReadUInt64BigEndian(g.AsSpan(8)));
        return BinaryPrimitives.ReadUInt16BigEndian(g.AsSpan(16));
    }

    public void SendClientFlags(uint flags = ClientFlagFixedNewstyle | ClientFlagNoZeroes) => Send(Be32(flags));

    public void SendOption(uint option, byte[] data, ulong magic = OptionMagic, uint? length = null)
    {
        var m = new byte[16 + data.Length];
        BinaryPrimitives.WriteUInt64BigEndian(m, magic);
        BinaryPrimitives.WriteUInt32BigEndian(m.AsSpan(8), option);
        BinaryPrimitives.WriteUInt32BigEndian(m.AsSpan(12), length ?? (uint)data.Length);
        data.CopyTo(m, 16);
        Send(m);
    }

    public (uint Option, uint Type, byte[] Data) ReadOptionReply()
    {
        var h = Receive(20);
        Assert.Equal(OptionReplyMagic, BinaryPrimitives.ReadUInt64BigEndian(h));
        var length = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(16));
        Assert.True(length < 1 << 20, $"option reply of {length} bytes");
        return (BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(8)), BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(12)), Receive((int)length));
    }

    public static byte[] GoData(string name, params ushort[] infos)
    {
        var n = Encoding.UTF8.GetBytes(name);
        var d = new byte[4 + n.Length + 2 + (2 * infos.Length)];
        BinaryPrimitives.WriteUInt32BigEndian(d, (uint)n.Length);
        n.CopyTo(d, 4);
        BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(4 + n.Length), (ushort)infos.Length);
        for (var i = 0; i < infos.Length; i++)
        {
            BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(6 + n.Length + (2 * i)), infos[i]);
        }
        return d;
    }

    public static byte[] MetaData(string name, params string[] queries)
    {
        var ms = new MemoryStream();
        var n = Encoding.UTF8.GetBytes(name);
        ms.Write(Be32((uint)n.Length));
        ms.Write(n);
        ms.Write(Be32((uint)queries.Length));
        foreach (var q in queries)
        {
            var b = Encoding.UTF8.GetBytes(q);
            ms.Write(Be32((uint)b.Length));
            ms.Write(b);
        }
        return ms.ToArray();
    }

    /// <summary>A complete handshake to the transmission phase.</summary>
    public RawNbd Connect(string export = "", bool structured = false, bool baseAllocation = false)
    {
        ReadGreeting();
        SendClientFlags();
        if (structured)
        {
            SendOption(OptStructuredReply, []);
            Assert.Equal(RepAck, ReadOptionReply().Type);
        }
        if (baseAllocation)
        {
            SendOption(OptSetMetaContext, MetaData(export, BaseAllocation));
            Assert.Equal(RepMetaContext, ReadOptionReply().Type);
            Assert.Equal(RepAck, ReadOptionReply().Type);
        }
        SendOption(OptGo, GoData(export));
        while (true)
        {
            var (_, type, data) = ReadOptionReply();
            if (type == RepAck)
            {
                break;
            }
            Assert.Equal(RepInfo, type);
            if (BinaryPrimitives.ReadUInt16BigEndian(data) == InfoExport)
            {
                Size = (long)BinaryPrimitives.ReadUInt64BigEndian(data.AsSpan(2));
                TransmissionFlags = BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(10));
            }
            else if (BinaryPrimitives.ReadUInt16BigEndian(data) == InfoBlockSize)
            {
                MaximumPayload = BinaryPrimitives.ReadUInt32BigEndian(data.AsSpan(10));
            }
        }
        return this;
    }

    public void Request(ushort type, ulong cookie, ulong offset, uint length, ushort flags = 0, byte[]? payload = null, uint magic = RequestMagic)
    {
        var m = new byte[RequestSize + (payload?.Length ?? 0)];
        BinaryPrimitives.WriteUInt32BigEndian(m, magic);
        BinaryPrimitives.WriteUInt16BigEndian(m.AsSpan(4), flags);
        BinaryPrimitives.WriteUInt16BigEndian(m.AsSpan(6), type);
        BinaryPrimitives.WriteUInt64BigEndian(m.AsSpan(8), cookie);
        BinaryPrimitives.WriteUInt64BigEndian(m.AsSpan(16), offset);
        BinaryPrimitives.WriteUInt32BigEndian(m.AsSpan(24), length);
        payload?.CopyTo(m, RequestSize);
        Send(m);
    }

    /// <summary>A simple reply's error and cookie.</summary>
    public (uint Error, ulong Cookie) ReadSimpleReply()
    {
        var r = Receive(SimpleReplySize);
        Assert.Equal(SimpleReplyMagic, BinaryPrimitives.ReadUInt32BigEndian(r));
        return (BinaryPrimitives.ReadUInt32BigEndian(r.AsSpan(4)), BinaryPrimitives.ReadUInt64BigEndian(r.AsSpan(8)));
    }

    /// <summary>The next reply, simple or structured: its cookie, error (0 for success) and payload.</summary>
    public (ulong Cookie, uint Error, ushort Type, byte[] Payload) ReadAnyReply(uint simpleReadLength = 0)
    {
        var magic = BinaryPrimitives.ReadUInt32BigEndian(Receive(4));
        if (magic == SimpleReplyMagic)
        {
            var rest = Receive(12);
            var error = BinaryPrimitives.ReadUInt32BigEndian(rest);
            var data = error == 0 && simpleReadLength > 0 ? Receive((int)simpleReadLength) : [];
            return (BinaryPrimitives.ReadUInt64BigEndian(rest.AsSpan(4)), error, 0, data);
        }
        Assert.Equal(StructuredReplyMagic, magic);
        var h = Receive(16);
        var type = BinaryPrimitives.ReadUInt16BigEndian(h.AsSpan(2));
        var cookie = BinaryPrimitives.ReadUInt64BigEndian(h.AsSpan(4));
        var payload = Receive((int)BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(12)));
        Assert.Equal(ReplyFlagDone, BinaryPrimitives.ReadUInt16BigEndian(h));
        var err = (type & 0x8000) != 0 ? BinaryPrimitives.ReadUInt32BigEndian(payload) : 0;
        return (cookie, err, type, payload);
    }

    /// <summary>True when the server has closed the connection (reads end-of-stream within the timeout).</summary>
    public bool IsClosedByServer(int timeoutMs = 5000)
    {
        Socket.ReceiveTimeout = timeoutMs;
        var buffer = new byte[4096];
        try
        {
            while (true)
            {
                var n = Socket.Receive(buffer);
                if (n == 0)
                {
                    return true;
                }
            }
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.TimedOut)
        {
            return false;
        }
        catch (SocketException)
        {
            return true; // reset
        }
    }

    public void Send(byte[] data)
    {
        var done = 0;
        while (done < data.Length)
        {
            done += Socket.Send(data.AsSpan(done));
        }
    }

    public byte[] Receive(int count)
    {
        var b = new byte[count];
        var done = 0;
        while (done < count)
        {
            var n = Socket.Receive(b.AsSpan(done));
            if (n == 0)
            {
                throw new EndOfStreamException($"server closed after {done} of {count} bytes");
            }
            done += n;
        }
        return b;
    }

    public static byte[] Be32(uint v)
    {
        var b = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, v);
        return b;
    }

    public void Dispose() => Socket.Dispose();
}
