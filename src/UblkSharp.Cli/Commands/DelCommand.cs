using System.CommandLine;
using UblkSharp.Cli.Logging;
using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp del`: <see cref="DeviceDeletion"/> of one device or of every one. A device that is
/// mounted or held open exclusively is refused as busy.
/// </summary>
internal static class DelCommand
{
    public static Command Create()
    {
        var number = new Option<int?>("--number", "-n") { Description = "The device id" };
        var all = new Option<bool>("--all", "-a") { Description = "Delete every ublk device" };
        var force = new Option<bool>("--force") { Description = "Delete even a mounted or held device: its IO fails from now on" };
        var command = new Command("del", "Stop and delete ublk devices") { number, all, force };
        command.SetAction(r =>
        {
            var id = r.GetValue(number);
            var everyDevice = r.GetValue(all);
            if (id is null == !everyDevice)
            {
                throw new ArgumentException("give either -n ID or --all");
            }
            if (id is < 0)
            {
                throw new ArgumentException($"bad device id {id}");
            }
            Preflight.RequireDriver();
            using var control = ControlDevice.Open();
            var ids = everyDevice ? DeviceList.Ids() : [(uint)id!.Value];
            var failures = 0;
            foreach (var dev in ids)
            {
                try
                {
                    DeviceDeletion.Delete(control, dev, r.GetValue(force), CliLog.Logger);
                }
                catch (Exception e) when (CliErrors.IsExpected(e) && everyDevice)
                {
                    CliLog.Error($"device {dev}: {CliErrors.Describe(e)}");
                    failures++;
                }
            }
            return failures == 0 ? 0 : CliErrors.Failure;
        });
        return command;
    }
}
