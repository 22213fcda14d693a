using System.Text.Json;
using UblkSharp.Cli.Logging;
using UblkSharp.Interop;
using UblkSharp.Runtime;

namespace UblkSharp.Cli;

/// <summary>
/// `ublksharp resize` asks the daemon serving a device to resize it, because the target in that
/// daemon must accept IO up to the new size before the kernel sends any (and the control ring is
/// the daemon's). The request is a file, ID.resize in the run directory (written whole, then
/// renamed in); the daemon looks for it on every turn of its wait loop (250 ms), resizes, records
/// the new size and answers in ID.resize-TOKEN.done, which the CLI reads and removes.
/// </summary>
internal static partial class ResizeRequests
{
    private static readonly TimeSpan AnswerTimeout = TimeSpan.FromSeconds(90);

    internal sealed record Request(string Token, long Size, bool Shrink, bool GrowFile);

    internal sealed record Answer(bool Ok, string Message, long Size);

    [System.Text.Json.Serialization.JsonSerializable(typeof(Request))]
    [System.Text.Json.Serialization.JsonSerializable(typeof(Answer))]
    internal sealed partial class Json : System.Text.Json.Serialization.JsonSerializerContext;

    private static string RequestPath(uint id) => Path.Combine(DeviceRecord.Directory, $"{id}.resize");

    private static string AnswerPath(uint id, string token) => Path.Combine(DeviceRecord.Directory, $"{id}.resize-{token}.done");

    /// <summary>CLI side: sends the request and waits for the daemon's answer; the size the device has now.</summary>
    public static long Send(uint id, int daemonPid, long size, bool shrink, bool growFile)
    {
        var token = Guid.NewGuid().ToString("N")[..12];
        var path = RequestPath(id);
        var temp = $"{path}.{token}.tmp";
        File.WriteAllText(temp, JsonSerializer.Serialize(new Request(token, size, shrink, growFile), Json.Default.Request));
        File.Move(temp, path, overwrite: true);
        var answerPath = AnswerPath(id, token);
        var deadline = DateTime.UtcNow + AnswerTimeout;
        try
        {
            while (true)
            {
                if (File.Exists(answerPath))
                {
                    var answer = JsonSerializer.Deserialize(File.ReadAllText(answerPath), Json.Default.Answer) ?? throw new IOException($"device {id}: an empty answer from its daemon");
                    File.Delete(answerPath);
                    return answer.Ok ? answer.Size : throw new IOException($"device {id}: {answer.Message}");
                }
                if (!Processes.IsAlive(daemonPid))
                {
                    throw new IOException($"device {id}: its daemon (pid {daemonPid}) ended before it answered the resize");
                }
                if (DateTime.UtcNow > deadline)
                {
                    throw new TimeoutException($"device {id}: its daemon (pid {daemonPid}) did not answer the resize within {AnswerTimeout.TotalSeconds:0} s");
                }
                Thread.Sleep(50);
            }
        }
        finally
        {
            // A request the daemon never took must not be taken later by surprise.
            try
            {
                if (File.Exists(path) && File.ReadAllText(path).Contains(token, StringComparison.Ordinal))
                {
                    File.Delete(path);
                }
            }
            catch (IOException)
            {
            }
        }
    }

    /// <summary>
    /// Daemon side, on the thread that created the device: takes a pending request, if any, and
    /// answers it. <paramref name="resized"/> is told the new size (to record it).
    /// </summary>
    public static void Serve(UblkDevice device, Action<long> resized)
    {
        var path = RequestPath(device.Id);
        Request? request;
        try
        {
            var text = File.ReadAllText(path);
            File.Delete(path);
            request = JsonSerializer.Deserialize(text, Json.Default.Request);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            return;
        }
        catch (Exception e) when (e is IOException or JsonException)
        {
            CliLog.Warning($"device {device.Id}: an unreadable resize request: {e.Message}");
            return;
        }
        if (request is null)
        {
            return;
        }
        Answer answer;
        try
        {
            device.Resize(request.Size, request.Shrink, request.GrowFile);
            var now = device.KernelSize;
            resized(now);
            CliLog.Information($"device {device.Id} resized to {now} bytes");
            answer = new Answer(true, "", now);
        }
        catch (Exception e) when (CliErrors.IsExpected(e) || e is InvalidOperationException)
        {
            answer = new Answer(false, CliErrors.Describe(e), 0);
        }
        var answerPath = AnswerPath(device.Id, request.Token);
        File.WriteAllText(answerPath + ".tmp", JsonSerializer.Serialize(answer, Json.Default.Answer));
        File.Move(answerPath + ".tmp", answerPath, overwrite: true);
    }
}
